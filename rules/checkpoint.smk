# The dense checkpoint, results/models/dense: trained by the pipeline (the tiny default; resumable: a
# killed run continues from results/checkpoints/train if that was made from the same settings), or
# downloaded from the Hub at a locked commit and imported strictly (`checkpoint: {source: huggingface}`).
CHECKPOINT = config.get("checkpoint", {"source": "train"})
FAMILY = config["model"].get("family", "mot")
# the MoT's sizes (what train-tiny builds and import-bagel expects): `model:` without the family's keys
MODEL_SIZES = {k: v for k, v in config["model"].items() if k not in ("family", "settings")}

if CHECKPOINT["source"] == "train":

    rule train_tiny:
        input:
            code=code("train-tiny"),
        output:
            model=directory(f"{R}/models/dense"),
            summary=f"{R}/train/summary.json",
        params:
            model=spec(MODEL_SIZES),
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


# The real checkpoint (config `checkpoint: {source: huggingface, lock: data/<name>.lock.json}`): the
# Hub repository the lock names, at the lock's commit, every file checked against its digest (the
# lock's, or the Hub's tree's at that commit where the lock leaves it null).
# Only the lock is an input (its path and content decide the job; no params, which --lint would flag as a
# hard-coded input path): a library edit must not re-download 30 GB. Offline with HF_HUB_OFFLINE=1 in
# the user's environment (the HF cache, `hub.cache` or HF_HUB_CACHE or HF_HOME, must then hold the
# locked commit).
if CHECKPOINT["source"] == "huggingface":
    from unisparse.hub import checkpoint_name, read_lock

    try:
        CHECKPOINT_NAME = checkpoint_name(read_lock(CHECKPOINT["lock"], complete=False)["repo_id"])
    except (OSError, ValueError) as e:
        raise WorkflowError(f"invalid config: checkpoint.lock: {e}") from None

    localrules:
        download_checkpoint,

    rule download_checkpoint:
        # a local rule (compute nodes are often offline), retried (downloads fail transiently)
        input:
            lock=CHECKPOINT["lock"],
        output:
            checkpoint=directory(f"{R}/checkpoints/{CHECKPOINT_NAME}"),
        retries: 2
        threads: res("download", "threads")
        resources:
            **resources_for("download"),
        log:
            f"{LOGS}/download_checkpoint.log",
        benchmark:
            f"{LOGS}/benchmarks/download_checkpoint.tsv"
        conda:
            "../environment.yml"
        # the user's own HF_HUB_OFFLINE (rules/inputs.smk), not the jobs' 1
        shell:
            'HF_HUB_OFFLINE="$UNISPARSE_HF_HUB_OFFLINE" unisparse --no-progress fetch-checkpoint --lock {input.lock:q} --out {output.checkpoint:q} 2> {log:q}'

    # The download as a unisparse model directory of its family (`model.family`): every tensor lands in
    # exactly one parameter (the loader names any missing, unexpected or mis-shaped key) and the tokenizer
    # travels with the weights. For the MoT the sizes must also be the config's `model:` (so the DAG's
    # checks, made from `model:` before any job runs, hold for the real weights).
    if FAMILY == "mot":

        rule import_checkpoint:
            input:
                code=code("import-bagel"),
                checkpoint=rules.download_checkpoint.output.checkpoint,
            output:
                model=directory(f"{R}/models/dense"),
            params:
                expect=spec(MODEL_SIZES),
                # the image sides the config plans with (BAGEL's own where it names none)
                sides=[f"--{k.replace('_', '-')}={MODEL_SIZES[k]}" for k in ("image_size", "vit_image_size") if k in MODEL_SIZES],
                runtime=runtime_args("import"),
            threads: res("import", "threads")
            resources:
                **resources_for("import"),
            log:
                f"{LOGS}/import_checkpoint.log",
            benchmark:
                f"{LOGS}/benchmarks/import_checkpoint.tsv"
            conda:
                "../environment.yml"
            shell:
                "unisparse --no-progress import-bagel {params.runtime:q} --src {input.checkpoint:q} {params.sides:q} --expect {params.expect:q}"
                " --out {output.model:q} 2> {log:q}"

    else:  # qwen_image: the diffusers snapshot, with the family's settings (image sizes, templates)

        rule import_checkpoint:
            input:
                code=code("import-qwen-image"),
                checkpoint=rules.download_checkpoint.output.checkpoint,
            output:
                model=directory(f"{R}/models/dense"),
            params:
                settings=spec(config["model"].get("settings", {})),
                runtime=runtime_args("import"),
            threads: res("import", "threads")
            resources:
                **resources_for("import"),
            log:
                f"{LOGS}/import_checkpoint.log",
            benchmark:
                f"{LOGS}/benchmarks/import_checkpoint.tsv"
            conda:
                "../environment.yml"
            shell:
                "unisparse --no-progress import-qwen-image {params.runtime:q} --src {input.checkpoint:q}"
                " --settings {params.settings:q} --out {output.model:q} 2> {log:q}"
