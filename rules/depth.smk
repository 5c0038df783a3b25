# Depth-pruning grid: drop sublayers of one component ranked on one task's calibration,
# then evaluate the result on both tasks (in the same process: one interpreter start per point).


rule prune_depth:
    input:
        unpack(lambda w: calibration_inputs(w.calib_task)),  # an iterative drop recalibrates
        code=code("prune-depth"),
        model=f"{R}/models/dense",
        stats=f"{R}/calibration/{{calib_task}}.safetensors",
        **evaluation_inputs(),
    output:
        model=directory(f"{R}/models/{DEPTH_PATH}"),
        metrics=f"{R}/metrics/{DEPTH_PATH}.json",
    wildcard_constraints:
        component=one_of(choices.COMPONENTS),
        calib_task=one_of(choices.TASKS),
        granularity=one_of(choices.GRANULARITIES),
        score=one_of(choices.DEPTH_SCORES),
        kv=one_of(choices.SKIPPED_ATTENTION_KV),
        mode=one_of(choices.DEPTH_MODES),
        drop=r"\d+",
    params:
        eval=spec(EVAL),
        store=MODEL_STORE,
        calib=spec(CALIB),
        meta=lambda w: spec({"stage": "depth", "variant_id": DEPTH_PATH.format(**w), **dict(w)}),
        iterative=lambda w: "--iterative" if w.mode == "iterative" else "",
        runtime=runtime_args("prune"),
    threads: res("prune", "threads")
    resources:
        **resources_for("prune"),
    log:
        f"{LOGS}/{DEPTH_PATH}.log",
    benchmark:
        f"{LOGS}/benchmarks/{DEPTH_PATH}.tsv"
    conda:
        "../environment.yml"
    shell:
        "unisparse --no-progress prune-depth {input.model:q} {params.runtime:q} --calibration {input.stats:q}"
        " --component {wildcards.component:q} --granularity {wildcards.granularity:q} --drop {wildcards.drop:q}"
        " --score {wildcards.score:q} --kv {wildcards.kv:q} {params.iterative:q} --calib-spec {params.calib:q}"
        " --out {output.model:q} --store {params.store:q} --metrics {output.metrics:q} --eval-spec {params.eval:q} --meta {params.meta:q} 2> {log:q}"
