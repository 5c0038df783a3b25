# Job resources come from the config (resources.<kind>, falling back to resources.default), so the
# model size decides them; the cluster profile only knows the cluster. The one place where the
# cluster's dialect matters is how a GPU is asked for: that is a site setting (see gpu_request).
import os
import re


#: resources a kind may leave out even in resources.default (their defaults)
OPTIONAL_RESOURCES = {"nodes": 1, "gpu_mem_gb": None}


def res(kind, key):
    """Resource `key` of job kind `kind`, falling back to resources.default."""
    resources = config["resources"]
    if key in OPTIONAL_RESOURCES:
        fallback = resources["default"].get(key, OPTIONAL_RESOURCES[key])
    else:
        fallback = resources["default"][key]
    return resources.get(kind, {}).get(key, fallback)


def site_setting(name, default=None):
    """A cluster site setting: $UNISPARSE_SLURM_<NAME>, else key <name> of the untracked
    workflow/profiles/slurm/site.yaml (or the file $UNISPARSE_SLURM_SITE names), else `default`.
    The slurm profile reads the same settings (workflow/profiles/slurm/config.yaml)."""
    value = os.environ.get(f"UNISPARSE_SLURM_{name.upper()}", "")
    if value != "":
        return value
    path = os.environ.get("UNISPARSE_SLURM_SITE") or os.path.join(
        workflow.basedir, "workflow", "profiles", "slurm", "site.yaml"
    )
    if os.path.isfile(path):
        from unisparse.spec import load_yaml_strict  # a duplicate key is an error, as in the config

        with open(path) as f:
            value = (load_yaml_strict(f.read(), path) or {}).get(name.lower())
        if value not in (None, ""):
            return str(value)
    return default


def gpu_request(gpus):
    """Resources that make the SLURM executor ask for `gpus` GPUs, in the site's syntax:
    gpus (default) -> sbatch --gpus=[model:]N; gres -> sbatch --gres=gpu[:model]:N.
    GPU jobs go to GPU_PARTITION where the site names one. Nothing for CPU-only jobs."""
    if not gpus:
        return {}
    syntax = site_setting("gpu", "gpus")
    model = site_setting("gpu_model")
    if syntax == "gpus":
        request = {"gpu": gpus, **({"gpu_model": model} if model else {})}
    elif syntax == "gres":
        request = {"gres": ":".join(["gpu", *([model] if model else []), str(gpus)])}
    else:
        raise ValueError(f"site setting UNISPARSE_SLURM_GPU must be 'gpus' or 'gres', not {syntax!r}")
    partition = site_setting("gpu_partition")
    if partition:
        request["slurm_partition"] = partition
    return request


def resources_for(kind):
    """The resources block of a job kind (threads are set separately with `threads:`).
    `gpus` is the count (local runs can cap it with --resources gpus=N; the SLURM job step
    passes it to srun); gpu_request adds what sbatch needs to allocate them."""
    nodes = res(kind, "nodes")
    return {
        "mem_mb": res(kind, "mem_mb"),
        "runtime": res(kind, "runtime"),
        "gpus": res(kind, "gpus"),
        **gpu_request(res(kind, "gpus")),
        **({"nodes": nodes} if nodes > 1 else {}),  # sbatch --nodes; the GPUs (and mem_mb) are per node
    }


# Where a job runs: the config's `runtime:` (rules/common.smk) and its job kind's GPUs. Rules pass
# both as params, so changing a runtime value (or a kind's GPU count) reruns exactly its jobs.
# The verbs that shard over several GPUs (FSDP2, the global batch split across processes); every
# other verb runs as one process, on one GPU, whatever its kind asks for.
MULTI_PROCESS_VERBS = ("train-tiny", "tune-moe", "tune")


def job_device(kind):
    """runtime.device as given; `auto` becomes `cuda` for a kind that asks for GPUs (a GPU job
    never falls back to the CPU silently: the CLI refuses `cuda` where there is none)."""
    device = RUNTIME["device"]
    return "cuda" if device == "auto" and res(kind, "gpus") > 0 else device


def runtime_args(kind):
    """The runtime options of every `unisparse` verb a rule of job kind `kind` calls
    (after the verb name; rules quote them with `{params.runtime:q}`)."""
    args = ["--device", job_device(kind), "--dtype", RUNTIME["dtype"]]
    if RUNTIME.get("threads") is not None:
        args += ["--threads", str(RUNTIME["threads"])]
    return args


def launcher(kind, verb):
    """The command that starts `verb` (rules: `{params.launch:q} --no-progress <verb> ...`):
    one process per GPU under torchrun for a multi-process verb whose kind asks for N > 1 GPUs,
    else plain `unisparse`. torchrun's standalone rendezvous picks a free port, so several such
    jobs on one node do not collide."""
    gpus, nodes = res(kind, "gpus"), res(kind, "nodes")
    if verb not in MULTI_PROCESS_VERBS or gpus * nodes <= 1:
        return ["unisparse"]
    if re.fullmatch(r"cuda:\d+", RUNTIME["device"]):
        raise WorkflowError(f"invalid config: runtime.device: {RUNTIME['device']!r} names one GPU, but resources of "
                            f"job kind {kind!r} ask for {gpus} GPUs and {verb} runs one process per GPU; "
                            f"use cuda or auto")
    if nodes > 1:  # srun starts one torchrun per node of the allocation, meeting on its first node
        script = os.path.join(workflow.basedir, "workflow", "scripts", "torchrun_nodes.sh")
        return ["sh", script, str(gpus), "-m", "unisparse"]
    return ["torchrun", "--standalone", "--nproc-per-node", str(gpus), "-m", "unisparse"]
