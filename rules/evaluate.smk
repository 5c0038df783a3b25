# One evaluator for every model variant: both tasks, parameters, FLOPs and latency.


rule evaluate:
    input:
        code=code("evaluate"),
        model=f"{R}/models/{{variant}}",
        **evaluation_inputs(),
    output:
        f"{R}/metrics/{{variant}}.json",
    wildcard_constraints:
        variant="dense",
    params:
        spec=spec(EVAL),
        meta=lambda w: spec({"stage": stage_of(w.variant), "variant_id": w.variant}),
        runtime=runtime_args("evaluate"),
    threads: res("evaluate", "threads")
    resources:
        **resources_for("evaluate"),
    log:
        f"{LOGS}/evaluate/{{variant}}.log",
    benchmark:
        f"{LOGS}/benchmarks/evaluate/{{variant}}.tsv"
    conda:
        "../environment.yml"
    shell:
        "unisparse --no-progress evaluate {input.model:q} {params.runtime:q} --spec {params.spec:q} --meta {params.meta:q} --out {output:q} 2> {log:q}"
