# MoE adaptation: partition a component's MLPs into experts, then tune routers (frozen) and
# experts + routers (full); every stage is evaluated on both tasks in the same process.


rule partition:
    input:
        code=code("partition"),
        model=f"{R}/models/dense",
        stats=f"{R}/calibration/{MOE.get('calib_task', 'gen')}.safetensors",
        **evaluation_inputs(),
    output:
        model=directory(f"{R}/models/{MOE_PATH}/none"),
        metrics=f"{R}/metrics/{MOE_PATH}/none.json",
    wildcard_constraints:
        **MOE_CONSTRAINTS,
    params:
        eval=spec(EVAL),
        store=MODEL_STORE,
        dense_layers=moe_dense_layers(),
        meta=lambda w: spec(moe_meta(w, "none")),
        seed=MOE.get("seed", 0),
        runtime=runtime_args("prune"),
    threads: res("prune", "threads")
    resources:
        **resources_for("prune"),
    log:
        f"{LOGS}/{MOE_PATH}/none.log",
    benchmark:
        f"{LOGS}/benchmarks/{MOE_PATH}/none.tsv"
    conda:
        "../environment.yml"
    shell:
        "unisparse --no-progress partition {input.model:q} {params.runtime:q} --component {wildcards.component:q}"
        " --num-experts {wildcards.num_experts:q} --top-k {wildcards.top_k:q} --method {wildcards.method:q}"
        " --router {wildcards.router:q} --shared-size {wildcards.shared_size:q} --dense-layers {params.dense_layers:q}"
        " --calibration {input.stats:q} --seed {params.seed:q}"
        " --out {output.model:q} --store {params.store:q} --metrics {output.metrics:q} --eval-spec {params.eval:q} --meta {params.meta:q} 2> {log:q}"


rule tune_moe:
    input:
        code=code("tune-moe"),
        model=moe_tuning_input,
        **tuning_data_inputs(),
        **evaluation_inputs(),
    output:
        model=directory(f"{R}/models/{MOE_PATH}/{{tuning}}"),
        metrics=f"{R}/metrics/{MOE_PATH}/{{tuning}}.json",
        summary=f"{R}/tuning/{MOE_PATH}/{{tuning}}.json",
    wildcard_constraints:
        tuning=one_of(choices.TUNING_MODES),
        **MOE_CONSTRAINTS,
    params:
        eval=spec(EVAL),
        store=MODEL_STORE,
        tune=lambda w: spec(MOE["tune"][w.tuning]),
        meta=lambda w: spec(moe_meta(w, w.tuning)),
        checkpoints=lambda w: f"{R}/checkpoints/{MOE_PATH.format(**w)}/{w.tuning}",
        data=tuning_data_args,
        launch=launcher("tune", "tune-moe"),
        runtime=runtime_args("tune"),
    threads: res("tune", "threads")
    resources:
        **resources_for("tune"),
    log:
        f"{LOGS}/{MOE_PATH}/{{tuning}}.log",
    benchmark:
        f"{LOGS}/benchmarks/{MOE_PATH}/{{tuning}}.tsv"
    conda:
        "../environment.yml"
    shell:
        "{params.launch:q} --no-progress tune-moe {input.model:q} {params.runtime:q} --component {wildcards.component:q} --mode {wildcards.tuning:q}"
        " --spec {params.tune:q} --checkpoint-dir {params.checkpoints:q} --summary {output.summary:q} {params.data:q}"
        " --out {output.model:q} --store {params.store:q} --metrics {output.metrics:q} --eval-spec {params.eval:q} --meta {params.meta:q} 2> {log:q}"


rule tune_control:
    # the controls: the MoE's full tuning (moe.tune.full) given to the dense model and to the static
    # width cut at the MoE's active fraction, so that "MoE recovers" is not just "tuning recovers"
    input:
        code=code("tune"),
        model=f"{R}/models/{{source}}",
        **tuning_data_inputs(),
        **evaluation_inputs(),
    output:
        model=directory(f"{R}/models/tuned/{{source}}"),
        metrics=f"{R}/metrics/tuned/{{source}}.json",
        summary=f"{R}/tuning/tuned/{{source}}.json",
    wildcard_constraints:
        source=CONTROL_SOURCE,
    params:
        eval=spec(EVAL),
        store=MODEL_STORE,
        tune=spec(MOE.get("tune", {}).get("full", {})),
        meta=lambda w: spec(control_meta(w.source)),
        component=MOE.get("component", "gen"),
        checkpoints=lambda w: f"{R}/checkpoints/tuned/{w.source}",
        data=tuning_data_args,
        launch=launcher("tune", "tune"),
        runtime=runtime_args("tune"),
    threads: res("tune", "threads")
    resources:
        **resources_for("tune"),
    log:
        f"{LOGS}/tuned/{{source}}.log",
    benchmark:
        f"{LOGS}/benchmarks/tuned/{{source}}.tsv"
    conda:
        "../environment.yml"
    shell:
        "{params.launch:q} --no-progress tune {input.model:q} {params.runtime:q} --component {params.component:q} --mode full"
        " --spec {params.tune:q} --checkpoint-dir {params.checkpoints:q} --summary {output.summary:q} {params.data:q}"
        " --out {output.model:q} --store {params.store:q} --metrics {output.metrics:q} --eval-spec {params.eval:q} --meta {params.meta:q} 2> {log:q}"
