# Width-reduction grid: keep the top fraction of one component's MLP neurons, then evaluate.


rule prune_width:
    input:
        code=code("prune-width"),
        model=f"{R}/models/dense",
        stats=width_calibration,
        **evaluation_inputs(),
    output:
        model=directory(f"{R}/models/{WIDTH_PATH}"),
        metrics=f"{R}/metrics/{WIDTH_PATH}.json",
    wildcard_constraints:
        component=one_of(choices.COMPONENTS),
        calib_task=one_of(choices.TASKS, ["none"]),
        score=one_of(choices.WIDTH_SCORES),
        keep_ratio=KEEP_RATIO_WILDCARD,
    params:
        eval=spec(EVAL),
        store=MODEL_STORE,
        meta=lambda w: spec({"stage": "width", "variant_id": WIDTH_PATH.format(**w), **dict(w), "keep_ratio": float(w.keep_ratio)}),
        calibration=lambda w, input: ["--calibration", *input.stats] if input.stats else [],
        seed=config.get("width", {}).get("seed", 0),
        runtime=runtime_args("prune"),
    threads: res("prune", "threads")
    resources:
        **resources_for("prune"),
    log:
        f"{LOGS}/{WIDTH_PATH}.log",
    benchmark:
        f"{LOGS}/benchmarks/{WIDTH_PATH}.tsv"
    conda:
        "../environment.yml"
    shell:
        "unisparse --no-progress prune-width {input.model:q} {params.runtime:q} --component {wildcards.component:q}"
        " --keep-ratio {wildcards.keep_ratio:q} --score {wildcards.score:q} {params.calibration:q} --seed {params.seed:q}"
        " --out {output.model:q} --store {params.store:q} --metrics {output.metrics:q} --eval-spec {params.eval:q} --meta {params.meta:q} 2> {log:q}"
