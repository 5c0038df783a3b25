# The dense checkpoint: the tiny default is trained by the pipeline itself (resumable: a killed run
# continues from results/checkpoints/train if that was made from the same settings).


rule train_tiny:
    input:
        code=code("train"),
    output:
        model=directory(f"{R}/models/dense"),
        summary=f"{R}/train/summary.json",
    params:
        model=spec(config["model"]),
        train=spec(config["train"]),
        launch=launcher("train", "train-tiny"),
        runtime=runtime_args("train"),
        checkpoints=f"{R}/checkpoints/train",
    threads: res("train", "threads")
    resources:
        **resources_for("train"),
    log:
        f"{LOGS}/train_tiny.log",
    benchmark:
        f"{LOGS}/benchmarks/train_tiny.tsv"
    conda:
        "../environment.yml"
    shell:
        "{params.launch:q} --no-progress train-tiny {params.runtime:q} --model {params.model:q} --train {params.train:q}"
        " --checkpoint-dir {params.checkpoints:q} --out {output.model:q} --summary {output.summary:q} 2> {log:q}"
