# MoE tuning data (config `moe.tune.data`): the shapes world by default (no rule: tuning draws it on
# the fly); otherwise raw text-to-image data, from a local `path` or a Hub dataset pinned by a `lock`,
# prepared once into verified shards of pre-encoded latents that every tuning job reads.
TUNE_DATA = (MOE.get("tune") or {}).get("data") or {"source": "shapes"}
TUNE_DATA_SOURCE = TUNE_DATA.get("source", "shapes")
#: the prepared set's directory, None for the shapes world
PREPARED = None if TUNE_DATA_SOURCE == "shapes" else f"{R}/tunedata/{TUNE_DATA_SOURCE}"
#: settings the prepare verb takes (where the raw files come from is the rule's input, not a setting)
PREPARE_SETTINGS = {k: v for k, v in TUNE_DATA.items() if k not in ("path", "lock")}


def distills():
    """Whether a tuning stage compares with the dense teacher (objective distill)."""
    tune = MOE.get("tune") or {}
    return any(tune.get(m, {}).get("objective", "flow") == "distill" for m in choices.TUNING_MODES)


def tuning_data_inputs():
    """Extra inputs of the tuning rules: the prepared data and, for distill, the dense teacher."""
    extra = {}
    if PREPARED:
        extra["data"] = PREPARED
    if distills():
        extra["teacher"] = f"{R}/models/dense"
    return extra


def tuning_data_args(wildcards, input):
    """`--data DIR --teacher DIR` for the tuning verbs, as the rule's inputs name them (a list: the
    shell's `:q` quotes each word, and an empty list adds none)."""
    args = []
    for name in ("data", "teacher"):
        if name in input.keys():
            args += [f"--{name}", getattr(input, name)]
    return args


if TUNE_DATA.get("lock"):
    from unisparse.hub import checkpoint_name, read_lock

    try:
        TUNE_DATA_NAME = checkpoint_name(read_lock(TUNE_DATA["lock"], complete=False)["repo_id"])
    except (OSError, ValueError) as e:
        raise WorkflowError(f"invalid config: moe.tune.data.lock: {e}") from None
    TUNE_DATA_RAW = f"{R}/raw/{TUNE_DATA_NAME}"

    localrules:
        download_tune_data,

    rule download_tune_data:
        # the dataset at the lock's commit, every file checked against the lock (a local rule: compute
        # nodes are often offline; retried, as downloads fail transiently)
        input:
            lock=TUNE_DATA["lock"],
        output:
            raw=directory(TUNE_DATA_RAW),
        retries: 2
        threads: res("download", "threads")
        resources:
            **resources_for("download"),
        log:
            f"{LOGS}/download_tune_data.log",
        conda:
            "../environment.yml"
        # the user's own HF_HUB_OFFLINE (rules/inputs.smk), not the jobs' 1
        shell:
            'HF_HUB_OFFLINE="$UNISPARSE_HF_HUB_OFFLINE" unisparse --no-progress fetch-checkpoint --lock {input.lock:q} --out {output.raw:q} 2> {log:q}'

else:
    TUNE_DATA_RAW = TUNE_DATA.get("path")


if PREPARED:

    rule prepare_tune_data:
        # decode, resize and centre-crop to the model's training resolution, encode once through the
        # model's own codec, tokenise, check the captions against the evaluation prompts
        input:
            code=code("prepare-tune-data"),
            model=f"{R}/models/dense",
            raw=TUNE_DATA_RAW,
        output:
            data=directory(PREPARED),
        params:
            settings=spec(PREPARE_SETTINGS),
            benchmark=check_benchmarks(EVAL.get("benchmarks"), implemented_only=False)["gen"],
            runtime=runtime_args("prepare"),
        threads: res("prepare", "threads")
        resources:
            **resources_for("prepare"),
        log:
            f"{LOGS}/prepare_tune_data.log",
        benchmark:
            f"{LOGS}/benchmarks/prepare_tune_data.tsv"
        conda:
            "../environment.yml"
        shell:
            "unisparse --no-progress prepare-tune-data {input.model:q} {params.runtime:q} --source-dir {input.raw:q}"
            " --settings {params.settings:q} --benchmark {params.benchmark:q} --out {output.data:q} 2> {log:q}"
