# Calibration statistics: one streaming pass per task over the calibration split.


rule calibrate:
    input:
        unpack(lambda w: calibration_inputs(w.task)),
        code=code("calibrate"),
        model=f"{R}/models/dense",
    output:
        stats=f"{R}/calibration/{{task}}.safetensors",
        sidecar=f"{R}/calibration/{{task}}.safetensors.json",
    wildcard_constraints:
        task=one_of(choices.TASKS),
    params:
        spec=spec(CALIB),
        runtime=runtime_args("calibrate"),
    threads: res("calibrate", "threads")
    resources:
        **resources_for("calibrate"),
    log:
        f"{LOGS}/calibrate/{{task}}.log",
    benchmark:
        f"{LOGS}/benchmarks/calibrate/{{task}}.tsv"
    conda:
        "../environment.yml"
    shell:
        "unisparse --no-progress calibrate {input.model:q} {params.runtime:q} --task {wildcards.task:q} --spec {params.spec:q}"
        " --out {output.stats:q} 2> {log:q}"
