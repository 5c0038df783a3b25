"""The ``unisparse`` command line: one verb per pipeline stage, each a thin call of the library.

Structured options (a config section) are passed as JSON (``--spec '{"steps": 100}'``) or as a
JSON/YAML file (``--spec @file.yaml``), so a Snakemake rule hands over exactly its config values.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import shutil
import sys
from pathlib import Path

import yaml

log = logging.getLogger("unisparse")


class UsageError(ValueError):
    """A bad command-line value: reported as one line naming the option, before any work."""


def parse_spec(text: str | None, option: str = "--spec") -> dict:
    """A JSON/YAML mapping given inline or as ``@file``; an error names the option. JSON first (YAML
    1.1 reads a JSON number such as 3e-3 as a string); a key given twice is refused in both."""
    from .spec import DuplicateKeyError, load_yaml_strict, non_finite

    if not text:
        return {}
    name = text[1:] if text.startswith("@") else option
    try:
        if text.startswith("@"):
            text = Path(text[1:]).read_text()
        spec = load_yaml_strict(text, name)
    except DuplicateKeyError as e:
        raise UsageError(f"{option}: {e}") from None
    except (OSError, yaml.YAMLError) as e:
        raise UsageError(f"{option}: not a readable JSON/YAML mapping ({str(e).splitlines()[0]})") from None
    if spec is None:
        return {}
    if not isinstance(spec, dict):
        raise UsageError(f"{option}: must be a mapping, got {type(spec).__name__}")
    bad = non_finite(spec)
    if bad is not None:  # JSON's NaN / Infinity, YAML's .nan / .inf: never a usable size or setting
        raise UsageError(f"{option}: {bad[0].lstrip('.')}={bad[1]!r}: not a finite number (nan and inf are refused)")
    return spec


def _settings(args, text: str | None, option: str, defaults: dict, what: str) -> dict:
    """Parse and check a settings option against the stage's defaults (unknown keys, types) up front;
    ``--threads`` overrides the stage's own ``threads``."""
    from .spec import merge_spec

    spec = parse_spec(text, option)
    try:
        merge_spec(defaults, spec, what)
    except ValueError as e:
        raise UsageError(f"{option}: {e}") from None
    if args.threads is not None and "threads" in defaults:
        spec["threads"] = args.threads
    return spec


def _eval_settings(args) -> dict:
    from .evaluate.runner import EVAL_DEFAULTS

    return _settings(args, getattr(args, "eval_spec", None), "--eval-spec", EVAL_DEFAULTS, "evaluation")


def _runtime(args):
    """(torch device, torch dtype) of this process: ``--device`` (under torchrun, a CUDA run takes
    its local rank's GPU) and ``--dtype``."""
    from .distributed import rank_device, world
    from .runtime import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    return rank_device(device, world(device)), resolve_dtype(args.dtype)


def _ratio(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _nonnegative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _device(text: str) -> str:
    from .runtime import check_device

    try:
        return check_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _dense_layers(text: str):
    from .choices import DENSE_LAYER_PRESETS

    if text in DENSE_LAYER_PRESETS:
        return text
    try:
        return [int(i) for i in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"first_last, none, or a comma list of layer indices, not {text!r}") from None


def _load(args):
    """The model in its family's adapter (on the run's device, in its dtype) and its directory's
    content hash (the provenance derived artifacts record)."""
    from .families import load_family
    from .io import directory_digest

    device, dtype = _runtime(args)
    return load_family(args.model_dir, device=device, dtype=dtype), directory_digest(args.model_dir)


def _load_calibration(path, family, model_sha256):
    from .calibrate import Calibration

    calibration = Calibration.load(path)
    calibration.check_applies_to(family, model_sha256)
    return calibration


def setup_logging(log_file: str | None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="w"))
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", handlers=handlers, force=True
    )


def _check_trainable(args) -> None:
    """Refuse a parameter dtype that cannot train (float16) before anything is loaded or built."""
    from .trainloop import check_trainable_dtype

    check_trainable_dtype(args.dtype, "--dtype")


def cmd_train_tiny(args) -> None:
    from .distributed import world
    from .io import write_json
    from .train import TRAIN_DEFAULTS, check_model_spec, train_tiny

    _check_trainable(args)
    model_spec = parse_spec(args.model, "--model")
    try:
        check_model_spec(model_spec)
    except ValueError as e:
        raise UsageError(f"--model: {e}") from None
    train_spec = _settings(args, args.train, "--train", TRAIN_DEFAULTS, "training")
    device, dtype = _runtime(args)
    summary = train_tiny(
        model_spec,
        train_spec,
        args.out,
        progress=not args.no_progress,
        device=device,
        dtype=dtype,
        checkpoint_dir=args.checkpoint_dir,
    )
    is_main = world().is_main  # rank 0 of a torchrun launch, or the only process
    if args.summary and is_main:
        write_json(args.summary, summary)
    if args.checkpoint_dir and is_main:
        shutil.rmtree(args.checkpoint_dir, ignore_errors=True)  # finished: nothing left to resume


def cmd_evaluate(args) -> None:
    from .evaluate import evaluate_model_dir
    from .evaluate.runner import EVAL_DEFAULTS
    from .io import write_json

    spec = _settings(args, args.spec, "--spec", EVAL_DEFAULTS, "evaluation")
    meta = parse_spec(args.meta, "--meta")
    device, dtype = _runtime(args)
    metrics = evaluate_model_dir(
        args.model_dir,
        spec,
        progress=not args.no_progress,
        device=device,
        dtype=dtype,
        artifacts_dir=_artifacts_dir(args.out),
    )
    if args.meta:
        metrics["variant"] = meta
    write_json(args.out, metrics)
    print(
        json.dumps(
            {"understanding": metrics["understanding"]["overall"], "generation": metrics["generation"]["overall"]}
        )
    )


def _artifacts_dir(metrics_path) -> Path:
    """Where an evaluation keeps what it made besides the scores (GenEval's image folders and per-image
    results): beside the metrics file, named after it (``metrics/x.json`` -> ``metrics/x.d/``)."""
    path = Path(metrics_path)
    return path.with_name(path.stem + ".d")


def _output_settings(args) -> tuple[dict, dict]:
    """The evaluation settings and variant metadata of a verb that writes a model: checked before
    any work, so a typo cannot leave a model behind and then fail."""
    if (args.eval_spec or args.meta) and not args.metrics:
        raise UsageError("--eval-spec and --meta only apply with --metrics")
    return _eval_settings(args), parse_spec(args.meta, "--meta")


def _finish(family, args, settings: tuple[dict, dict]) -> None:
    """Save a derived model atomically and, if asked, evaluate it in the same process (saves the
    seconds of a second interpreter start per grid point)."""
    from .text import tokenizer_files

    with _stored(args) as out:
        family.save(out, extra_files=tokenizer_files(args.model_dir))  # the tokenizer travels along
    _evaluate(family, args, settings)


@contextlib.contextmanager
def _stored(args):
    """Where a verb writes its model: ``--out`` itself (``--store full``), or a scratch directory
    beside it whose content then becomes ``--out`` as a delta of the input model (``--store delta``)."""
    if getattr(args, "store", "full") != "delta":
        yield args.out
        return
    import tempfile

    from .deltas import write_delta

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".full-", dir=Path(args.out).parent) as scratch:
        full = Path(scratch) / "model"
        yield full
        if full.exists():
            from .families import layout_of

            write_delta(full, args.model_dir, args.out, layout_of(full))


def _evaluate(family, args, settings: tuple[dict, dict]) -> None:
    """Evaluate a model just written to ``args.out`` into ``args.metrics``, if asked."""
    from .io import write_json

    eval_spec, meta = settings
    if args.metrics:
        from .evaluate import evaluate_model

        metrics = evaluate_model(
            family, eval_spec, progress=not args.no_progress, artifacts_dir=_artifacts_dir(args.metrics)
        )
        metrics["model_dir"] = str(args.out)
        metrics["variant"] = meta
        for component in family.components:
            spec = family.moe_spec(component)
            if not spec:
                continue
            from .moe.tune import expert_load

            detail = expert_load(family, component)
            metrics["expert_load"] = {
                "cv_mean": detail["cv_mean"],
                "experts_used_frac": detail["experts_used_frac"],
                "num_experts": spec["num_experts"],
                "top_k": spec["top_k"],
            }
            metrics["expert_load_detail"] = detail
        write_json(args.metrics, metrics)


def cmd_calibrate(args) -> None:
    from .calibrate import CALIB_DEFAULTS, run_calibration, save_stats

    spec = _settings(args, args.spec, "--spec", CALIB_DEFAULTS, "calibration")
    family, digest = _load(args)
    meta = {"model_dir": str(args.model_dir)}
    if digest is None:  # no SHA256SUMS to hash: record the weights' own hash instead (see io.state_digest)
        from .io import state_digest

        meta["model_state_sha256"] = state_digest(family.model)
    stats = run_calibration(
        family, args.task, spec, progress=not args.no_progress, inputs=_calibration_inputs(args.task, spec, family)
    )
    save_stats(stats, args.task, args.out, meta=meta, model_sha256=digest)


def _calibration_inputs(task, spec, family):
    """The calibration split of the benchmark the settings name for ``task`` (None: the shapes world's)."""
    from .calibrate import CALIB_DEFAULTS
    from .evaluate.calibration_inputs import calibration_inputs
    from .spec import merge_spec

    return calibration_inputs(task, merge_spec(CALIB_DEFAULTS, spec, "calibration"), family)


def cmd_prune_depth(args) -> None:
    from .calibrate import CALIB_DEFAULTS, Calibration, run_calibration
    from .prune import prune_depth

    settings = _output_settings(args)
    calib_spec = _settings(args, args.calib_spec, "--calib-spec", CALIB_DEFAULTS, "calibration")
    family, digest = _load(args)
    if args.component not in family.components:
        raise UsageError(f"--component {args.component}: the {family.name} family has {list(family.components)}")
    calibration = _load_calibration(args.calibration, family, digest)
    layers = family.num_layers(args.component)
    n_drop = args.drop if args.drop is not None else round((1 - args.keep_ratio) * layers)
    if n_drop > layers:
        raise UsageError(f"--drop {n_drop}: the model has {layers} layers")

    def recalibrate(f):
        inputs = _calibration_inputs(calibration.task, calib_spec, f)
        return Calibration.from_stats(run_calibration(f, calibration.task, calib_spec, inputs=inputs), calibration.task)

    pruned = prune_depth(
        family,
        calibration,
        args.component,
        args.granularity,
        n_drop,
        score=args.score,
        skipped_attention_kv=args.kv,
        iterative=args.iterative,
        recalibrate=recalibrate,
    )
    _finish(pruned, args, settings)


def cmd_prune_width(args) -> None:
    from .choices import DATA_FREE_WIDTH_SCORES
    from .prune import prune_width

    settings = _output_settings(args)
    if args.score not in DATA_FREE_WIDTH_SCORES and not args.calibration:
        raise UsageError(f"--score {args.score} needs --calibration")
    family, digest = _load(args)
    calibration = _load_calibration(args.calibration, family, digest) if args.calibration else None
    pruned = prune_width(
        family, args.component, args.keep_ratio, score=args.score, calibration=calibration, seed=args.seed
    )
    _finish(pruned, args, settings)


def cmd_aggregate(args) -> None:
    from .tables import aggregate

    df = aggregate(args.metrics, args.out)
    print(f"{len(df)} rows -> {args.out}")


def _add_output_args(s) -> None:
    from .choices import MODEL_STORES

    s.add_argument("--out", required=True, help="model directory to write")
    s.add_argument(
        "--store",
        default="full",
        choices=MODEL_STORES,
        help="write a standalone copy (full) or a delta of the input model (its content hash plus what differs)",
    )
    s.add_argument("--metrics", help="also evaluate the result and write its metrics JSON here")
    s.add_argument("--eval-spec", help="evaluation settings (JSON/YAML or @file)")
    s.add_argument("--meta", help="grid coordinates of this variant, stored with the metrics")


def _register_probes(sub) -> None:
    from .choices import (
        COMPONENTS,
        GRANULARITIES,
        SKIPPED_ATTENTION_KV,
        TASKS,
        WIDTH_SCORES,
    )
    from .choices import (
        DEPTH_SCORES as SCORE_DEFINITIONS,
    )

    s = sub.add_parser("calibrate", parents=[runtime_options()], help="streaming calibration statistics for one task")
    s.add_argument("model_dir")
    s.add_argument("--task", required=True, choices=TASKS)
    s.add_argument("--spec", help="calibration settings (JSON/YAML or @file)")
    s.add_argument("--out", required=True, help=".safetensors file (a .json sidecar is written beside it)")
    s.set_defaults(func=cmd_calibrate)

    s = sub.add_parser(
        "prune-depth", parents=[runtime_options()], help="drop the sublayers that change the residual stream least"
    )
    s.add_argument("model_dir")
    s.add_argument("--calibration", required=True, help="calibration .safetensors")
    s.add_argument("--component", required=True, choices=COMPONENTS)
    s.add_argument("--granularity", default="block", choices=GRANULARITIES)
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--drop", type=_nonnegative, help="number of sublayers to drop")
    g.add_argument("--keep-ratio", type=_ratio, help="fraction of layers to keep")
    s.add_argument(
        "--score", default="ld", choices=SCORE_DEFINITIONS, help="cosine definition (ld or as-published bagel)"
    )
    s.add_argument(
        "--kv",
        default="keep",
        choices=SKIPPED_ATTENTION_KV,
        help="keep: a dropped und attention still provides the prompt's K/V; none: as published",
    )
    s.add_argument("--iterative", action="store_true", help="drop one, recalibrate, repeat")
    s.add_argument("--calib-spec", help="calibration settings for the iterative variant")
    _add_output_args(s)
    s.set_defaults(func=cmd_prune_depth)

    s = sub.add_parser(
        "prune-width", parents=[runtime_options()], help="keep the top fraction of MLP neurons of a component"
    )
    s.add_argument("model_dir")
    s.add_argument("--component", required=True, choices=COMPONENTS)
    s.add_argument("--keep-ratio", required=True, type=_ratio)
    s.add_argument("--score", default="act_norm", choices=WIDTH_SCORES)
    s.add_argument("--calibration", help="calibration .safetensors (needed by act_norm and published)")
    s.add_argument("--seed", type=_nonnegative, default=0, help="seed of the random score")
    _add_output_args(s)
    s.set_defaults(func=cmd_prune_width)

    s = sub.add_parser("aggregate", help="metrics JSON files -> one tidy CSV")
    s.add_argument("metrics", nargs="+")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_aggregate)


def cmd_partition(args) -> None:
    from .moe.convert import check_moe_request, convert_to_moe
    from .sizes import moe_layers

    settings = _output_settings(args)
    if args.method == "cluster" and not args.calibration:
        raise UsageError("--method cluster needs --calibration (with co-activation statistics)")
    family, digest = _load(args)
    try:
        moe_layers(family.num_layers(args.component), args.dense_layers)
    except ValueError as e:
        raise UsageError(f"--dense-layers: {e}") from None
    check_moe_request(
        family, args.component, args.num_experts, args.top_k, args.shared_size, args.router, args.dense_layers
    )
    calibration = _load_calibration(args.calibration, family, digest) if args.calibration else None
    moe = convert_to_moe(
        family,
        args.component,
        args.num_experts,
        args.top_k,
        method=args.method,
        calibration=calibration,
        shared_size=args.shared_size,
        dense_layers=args.dense_layers,
        router=args.router,
        seed=args.seed,
    )
    _finish(moe, args, settings)


def cmd_tune_moe(args) -> None:
    from .distributed import peak_rss_mb, world
    from .io import write_json
    from .moe.tune import TUNE_DEFAULTS, tune_moe
    from .runtime import return_freed_memory

    return_freed_memory()
    _check_trainable(args)
    settings = _output_settings(args)
    spec = _settings(args, args.spec, "--spec", TUNE_DEFAULTS, "tuning")
    if spec.get("objective", TUNE_DEFAULTS["objective"]) == "distill" and not args.teacher:
        raise UsageError("--spec: objective distill needs --teacher (the dense model the tuned one came from)")
    data = _tuning_data(args)
    sharded = _sharded_tuning(args, spec)
    # the input's identity: the tensors' hash (io.state_digest), streamed from the files when sharded
    family, digest = sharded if sharded else (_load(args)[0], None)
    teacher = None
    if args.teacher:
        from .families import load_family

        teacher = load_family(args.teacher, device=family.device, dtype=family.dtype)
    summary = tune_moe(
        family,
        args.component,
        args.mode,
        spec,
        checkpoint_dir=args.checkpoint_dir,
        progress=not args.no_progress,
        data=data,
        teacher=teacher,
        input_digest=digest,
    )
    if sharded:
        _finish_sharded(family, args, settings)
    elif world().is_main:
        _finish(family, args, settings)
    w = world()  # the peak goes to the log, not the summary: artifacts hold no measurement but times
    logging.getLogger("unisparse.tune").info("rank %d peak resident memory %.0f MB", w.rank, peak_rss_mb())
    if not w.is_main:
        return  # under torchrun: rank 0 writes the summary and removes the checkpoints
    if args.summary:
        write_json(args.summary, summary)
    if args.checkpoint_dir:
        shutil.rmtree(args.checkpoint_dir, ignore_errors=True)  # finished: nothing left to resume


def _sharded_tuning(args, spec: dict):
    """``(family, input digest)`` of a tuning that runs sharded (several processes, fp32 master
    weights for a lower-precision model, or activation checkpointing): the model built on the meta
    device and each rank filled with its own rows from the files (``sharding``); None for a plain
    single-process run, which loads the model whole as before."""
    from .deltas import is_delta_dir, materialise
    from .distributed import single_process_group, world
    from .families import family_class, family_name_of
    from .io import verify_model_dir
    from .moe.tune import TUNE_DEFAULTS, trainable_names
    from .sharding import WeightFiles, shard, streamed_state_digest
    from .spec import merge_spec
    from .trainloop import master_dtype_of

    cfg = merge_spec(TUNE_DEFAULTS, spec, "tuning")
    device, dtype = _runtime(args)
    w = world(device)
    cls = family_class(family_name_of(args.model_dir))
    model_dtype = dtype or _stored_dtype(args.model_dir)
    master = master_dtype_of(cfg, model_dtype)
    if not (w.sharded or master != model_dtype or cfg["activation_checkpointing"]):
        return None
    if not w.sharded:
        single_process_group(device)
    source_dir = Path(args.model_dir)
    if is_delta_dir(source_dir):  # every rank reads its rows from one standalone copy beside the output
        source_dir = _input_copy(args)
        if w.is_main:
            materialise(args.model_dir, source_dir, cls.weight_layout())
    elif w.is_main:
        verify_model_dir(source_dir)  # once, not by every rank
    w.barrier()
    family = cls.load_empty(source_dir, model_dtype)
    names = trainable_names(family, args.component, args.mode)
    source = WeightFiles(source_dir, family.weight_layout())
    shard(family, names, device, model_dtype, master, cfg["activation_checkpointing"], source=source)
    family.model.eval()
    return family, streamed_state_digest(family.model, source, w, device, model_dtype)


def _input_copy(args) -> Path:
    """Where a sharded tuning of a delta input keeps the input's standalone copy (beside ``--out``,
    on the file system every rank sees), until the tuned model is written."""
    return Path(args.out).parent / f".{Path(args.out).name}.input"


def _stored_dtype(model_dir):
    """The dtype a model directory (a delta: its parent) stores its weights in."""
    from .deltas import is_delta_dir, parent_of
    from .sharding import stored_float_dtype

    while is_delta_dir(model_dir):
        model_dir = parent_of(model_dir)
    try:
        return stored_float_dtype(model_dir, "**/*.safetensors")
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None


def _finish_sharded(family, args, settings) -> None:
    """Write a sharded model unit by unit (every rank takes part), then evaluate the written
    directory in the main process (one device holds the model for inference)."""
    from .distributed import world
    from .sharding import save_sharded
    from .text import tokenizer_files

    w = world()
    with _stored(args) if w.is_main else contextlib.nullcontext(args.out) as out:
        saved = save_sharded(family, out, w, dtype=family.dtype, extra_files=tokenizer_files(args.model_dir))
    logging.getLogger("unisparse.tune").info(
        "rank %d wrote %s unit by unit: largest unit %.0f MB, resident %.0f MB before, at most %.0f MB while saving",
        w.rank, args.out, saved["peak_group_bytes"] / 2**20, saved["rss_before_mb"], saved["rss_peak_mb"],
    )  # fmt: skip
    if w.is_main:
        shutil.rmtree(_input_copy(args), ignore_errors=True)
    if w.is_main and args.metrics:
        from .families import load_family

        device, dtype = _runtime(args)
        _evaluate(load_family(args.out, device=device, dtype=dtype), args, settings)


def _tuning_data(args):
    """The prepared tuning data of ``--data`` (verified: every shard against its sha256), or None."""
    if not args.data:
        return None
    from .tunedata.latents import LatentSet

    return LatentSet(args.data)


def cmd_prepare_tune_data(args) -> None:
    from collections import Counter

    from .io import sha256_file
    from .tunedata.prepare import check_settings, prepare_tune_data
    from .tunedata.sources import read_records, source_files

    try:
        settings = check_settings(parse_spec(args.settings, "--settings"))
    except ValueError as e:
        raise UsageError(f"--settings: {e}") from None
    if settings["source"] == "shapes":
        raise UsageError("--settings: source shapes has no prepare stage (tuning draws the shapes world)")
    prompts = _evaluation_prompts(args.benchmark, args.check_against, args.prompts_file)
    files = source_files(args.source_dir, settings["source"])
    inputs = [{"file": f.name, "bytes": f.stat().st_size, "sha256": sha256_file(f)} for f in files]
    family, _ = _load(args)
    skipped = Counter()
    manifest = prepare_tune_data(
        family,
        read_records(args.source_dir, settings, skipped),
        args.out,
        settings,
        prompts,
        skipped=skipped,
        inputs=inputs,
        progress=not args.no_progress,
    )
    print(json.dumps({k: manifest[k] for k in ("count", "skipped", "latent_shape")}))


def _evaluation_prompts(benchmark: str, sets, files) -> dict[str, list[str]]:
    """The generation prompts a tuning set is checked against: the generation benchmark's (GenEval:
    its short and long sets, the repository's metadata files) and any prompt files given (``.txt``
    lines or ``.jsonl`` ``prompt``). The shapes world's prompts are no outside benchmark's."""
    prompts = {}
    if benchmark == "geneval":
        from .evaluate.geneval import load_metadata

        prompts.update({f"geneval_{v}": [e["prompt"] for e in load_metadata(v)] for v in sets})
    for path in files or ():
        path = Path(path)
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        prompts[path.name] = [json.loads(line)["prompt"] for line in lines] if path.suffix == ".jsonl" else lines
    return prompts


def _register_moe(sub) -> None:
    from .choices import COMPONENTS, ROUTERS
    from .choices import PARTITION_METHODS as METHODS
    from .choices import TUNING_MODES as MODES

    s = sub.add_parser(
        "partition", parents=[runtime_options()], help="split a component's MLPs into experts (dense -> MoE)"
    )
    s.add_argument("model_dir")
    s.add_argument("--component", required=True, choices=COMPONENTS)
    s.add_argument("--num-experts", type=_positive, required=True)
    s.add_argument("--top-k", type=_positive, required=True)
    s.add_argument("--method", default="snake", choices=METHODS)
    s.add_argument("--router", default="paper", choices=ROUTERS)
    s.add_argument("--shared-size", type=_nonnegative, default=0, help="neurons of an always-active shared expert")
    s.add_argument(
        "--dense-layers",
        type=_dense_layers,
        default="first_last",
        help="first_last, none, or a comma list of layers kept dense",
    )
    s.add_argument("--calibration", help="calibration .safetensors (neuron importance; co-activation for cluster)")
    s.add_argument("--seed", type=_nonnegative, default=0)
    _add_output_args(s)
    s.set_defaults(func=cmd_partition)

    s = sub.add_parser(
        "tune-moe",
        aliases=["tune"],
        parents=[runtime_options()],
        help="tune a component on the flow loss: routers only (frozen, MoE) or its whole MLPs / MoE "
        "blocks (full; on a dense or width-cut component: the tuned controls)",
    )
    s.add_argument("model_dir")
    s.add_argument("--component", default="gen", choices=COMPONENTS)
    s.add_argument("--mode", required=True, choices=MODES)
    s.add_argument("--spec", help="tuning settings (JSON/YAML or @file)")
    s.add_argument("--checkpoint-dir", help="where to keep resumable checkpoints (removed on success)")
    s.add_argument("--summary", help="JSON file for the tuning summary")
    s.add_argument("--data", help="prepared tuning data (prepare-tune-data's directory); default: the shapes world")
    s.add_argument("--teacher", help="the dense model directory the distill objective compares with")
    _add_output_args(s)
    s.set_defaults(func=cmd_tune_moe)

    from .choices import BENCHMARKS, GENEVAL_PROMPT_SETS

    s = sub.add_parser(
        "prepare-tune-data",
        parents=[runtime_options()],
        help="encode raw text-to-image data once through the model's codec and tokenizer into "
        "verified latent shards, checked against the evaluation prompts",
    )
    s.add_argument("model_dir", help="the dense model (its codec encodes, its tokenizer tokenises)")
    s.add_argument("--source-dir", required=True, help="the raw data: WebDataset tars, BAGEL parquet or caption files")
    s.add_argument("--settings", help="tune data settings (JSON/YAML or @file; config moe.tune.data)")
    s.add_argument(
        "--benchmark",
        default="geneval",
        choices=BENCHMARKS["gen"],
        help="the generation benchmark whose prompts the captions are checked against (default: geneval)",
    )
    s.add_argument(
        "--check-against",
        nargs="*",
        default=list(GENEVAL_PROMPT_SETS),
        choices=GENEVAL_PROMPT_SETS,
        help="GenEval's prompt sets checked (default: both)",
    )
    s.add_argument("--prompts-file", action="append", help="more evaluation prompts (.txt lines or .jsonl prompt)")
    s.add_argument("--out", required=True, help="the prepared directory (shards + manifest.json)")
    s.set_defaults(func=cmd_prepare_tune_data)


def cmd_memory_plan(args) -> None:
    """Print the per-GPU memory plan of a config's tuning jobs, or of one tuning of a model directory."""
    from . import memplan

    if bool(args.config) == bool(args.model_dir):
        raise UsageError("give either --config (every tuning job of a DAG) or --model-dir (one tuning of a model)")
    if args.config:
        from .config_checks import check_config_file

        rows = memplan.config_plans(check_config_file(args.config), gpus=args.gpus, gpu_mem_gb=args.gpu_mem_gb)
        if not rows:
            raise UsageError(f"{args.config}: no MoT tuning jobs to plan (a Qwen-Image plan needs --model-dir)")
        for row in rows:
            fewest = f"; fewest GPUs that fit: {row['smallest_fit']}" if row["smallest_fit"] else ""
            verdict = "" if row["fits"] is None else (" fits" if row["fits"] else " DOES NOT FIT")
            print(f"{row['job']}: {memplan.describe(row['plan'], row['gpus'], row['gpu_mem_gb'])}{verdict}{fewest}")
        if args.json:
            from .io import write_json

            write_json(args.json, rows)
        return
    from .families import family_class, family_name_of
    from .moe.tune import TUNE_DEFAULTS
    from .spec import merge_spec

    cfg = merge_spec(TUNE_DEFAULTS, parse_spec(args.spec, "--spec") if args.spec else {}, "tuning")
    family = family_class(family_name_of(args.model_dir)).load_empty(args.model_dir)
    sizes = memplan.sizes_from_family(family, args.component, args.mode, args.tokens)
    gpus = args.gpus or 1
    result = memplan.plan(
        sizes,
        gpus=gpus,
        batch=cfg["batch_gen"],
        dtype=args.dtype or str(family.dtype).replace("torch.", ""),
        master_dtype=cfg["master_dtype"],
        activation_checkpointing=bool(cfg["activation_checkpointing"]),
        device=args.device,
    )
    print(memplan.describe(result, gpus, args.gpu_mem_gb))
    if args.json:
        from dataclasses import asdict

        from .io import write_json

        write_json(args.json, {"sizes": asdict(sizes), "plan": result, "gpus": gpus})


def cmd_materialise(args) -> None:
    from .deltas import is_delta_dir, materialise

    if not is_delta_dir(args.model_dir):
        raise UsageError(f"{args.model_dir} is not a delta directory (no delta.json): it is standalone already")
    from .families import layout_of

    print(materialise(args.model_dir, args.out, layout_of(args.model_dir)))


def cmd_export_benchmarks(args) -> None:
    from .worlds.export import export_benchmarks

    for path in export_benchmarks(args.out):
        print(path)


def _register_data(sub) -> None:
    s = sub.add_parser("export-benchmarks", help="write ShapesGenEval prompts, checks and splits as metadata files")
    s.add_argument("--out", default="data", help="directory (default: data)")
    s.set_defaults(func=cmd_export_benchmarks)

    from .choices import COMPONENTS, TUNING_MODES

    s = sub.add_parser(
        "memory-plan",
        help="per-GPU memory of tuning jobs (weights, gradients, optimizer, activations, overhead): every "
        "tuning of a config (what the DAG checks), or one tuning of a model directory",
    )
    s.add_argument("--config", help="a workflow config (its moe: tunings and resources.tune)")
    s.add_argument("--model-dir", help="a model directory (exact sizes; nothing is read but headers)")
    s.add_argument("--component", default="gen", choices=COMPONENTS)
    s.add_argument("--mode", default="full", choices=TUNING_MODES)
    s.add_argument(
        "--spec", help="tuning settings (JSON/YAML or @file): batch_gen, master_dtype, activation_checkpointing"
    )
    s.add_argument("--tokens", type=_positive, help="generation tokens per example (default: latent tokens + 128)")
    s.add_argument("--gpus", type=_positive, help="GPUs (processes) to plan for (default: resources.tune's, or 1)")
    s.add_argument("--gpu-mem-gb", type=float, help="memory of one GPU, GB: says whether the plan fits")
    s.add_argument("--dtype", help="the model's dtype (default: the stored one)")
    s.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="whose runtime overhead to count")
    s.add_argument("--json", help="also write the plan as JSON")
    s.set_defaults(func=cmd_memory_plan)

    s = sub.add_parser(
        "materialise",
        help="write the standalone model directory of a delta (to share or serve it); its parent must be "
        "where the delta says, with the content it recorded",
    )
    s.add_argument("model_dir", help="a delta directory (written with --store delta)")
    s.add_argument("--out", required=True, help="the standalone directory to write")
    s.set_defaults(func=cmd_materialise)


def cmd_fetch_checkpoint(args) -> None:
    from .hub import fetch_checkpoint

    print(fetch_checkpoint(args.lock, args.out, cache_dir=args.cache_dir, progress=not args.no_progress))


def cmd_fetch_input(args) -> None:
    from .hub import fetch_input

    manifest = fetch_input(args.lock, args.out, cache_dir=args.cache_dir, progress=not args.no_progress)
    print(f"{manifest['repo_id']}@{manifest['revision']}: {len(manifest['files'])} files verified -> {args.out}")


def cmd_lock_checkpoint(args) -> None:
    from .hub import lock_checkpoint, read_lock

    old = read_lock(args.out, complete=False) if Path(args.out).is_file() else {}
    files = args.file or sorted(old.get("files", {}))
    patterns = [] if args.file else old.get("patterns", [])
    repo_id = args.repo_id or old.get("repo_id")
    if not (files or patterns) or not repo_id:
        raise UsageError(f"{args.out} does not exist: name the repository (--repo-id) and every file to lock (--file)")
    repo_type = args.repo_type or old.get("repo_type", "model")
    lock = lock_checkpoint(repo_id, args.revision, files, args.out, repo_type=repo_type, patterns=patterns)
    print(f"{lock['repo_id']}@{lock['revision']}: {len(lock['files'])} files -> {args.out}")


def _fetch_arguments(s, lock_example: str, out_help: str) -> None:
    """The arguments both fetch verbs take: the lock, what to write, the cache."""
    s.add_argument("--lock", required=True, help=f"lock file, e.g. {lock_example}")
    s.add_argument("--out", required=True, help=out_help)
    s.add_argument("--cache-dir", help="Hugging Face cache (default: HF_HUB_CACHE, else HF_HOME/hub)")


def _register_checkpoint(sub) -> None:
    from .hub import REPO_TYPES

    s = sub.add_parser(
        "fetch-checkpoint",
        help="download a Hub checkpoint at its locked commit, every file checked "
        "against the lock's sha256 (offline from the HF cache with HF_HUB_OFFLINE=1)",
    )
    _fetch_arguments(
        s, "data/bagel-7b-mot.lock.json", "directory to write (appears complete and verified, or not at all)"
    )
    s.set_defaults(func=cmd_fetch_checkpoint)

    s = sub.add_parser(
        "fetch-input",
        help="download a locked Hub input (detector, CLIP, benchmark dataset) into the Hugging Face cache "
        "at its commit, verify it there and write a manifest; jobs then read it offline",
    )
    _fetch_arguments(s, "data/mme.lock.json", "the manifest to write (JSON)")
    s.set_defaults(func=cmd_fetch_input)

    s = sub.add_parser(
        "lock-checkpoint",
        help="(re)write a lock file from the Hub's tree listing, downloading nothing: the commit a "
        "revision resolves to, each file's size and digest (sha256 for LFS files, git blob id for the rest)",
    )
    s.add_argument("--repo-id", help="e.g. ByteDance-Seed/BAGEL-7B-MoT (default: the existing lock's)")
    s.add_argument("--revision", default="main", help="branch, tag or commit to lock (default: main)")
    s.add_argument("--file", action="append", help="a file to lock, repeatable (default: the existing lock's files)")
    s.add_argument("--out", required=True, help="lock file to write, e.g. data/bagel-7b-mot.lock.json")
    s.add_argument(
        "--repo-type", choices=REPO_TYPES, help="model or dataset (default: the existing lock's, else model)"
    )
    s.set_defaults(func=cmd_lock_checkpoint)


def cmd_import_bagel(args) -> None:
    from .io import save_model
    from .models.bagel import load_bagel
    from .text import tokenizer_files

    device, dtype = _runtime(args)
    expect = parse_spec(args.expect, "--expect") if args.expect else {}
    if expect:  # before any weight is read: the sizes the workflow planned with must be the checkpoint's
        from .models.bagel import config_from_bagel

        config = config_from_bagel(args.src, args.image_size, args.vit_image_size)
        wrong = [
            f"{k}: config {v!r}, checkpoint {getattr(config, k, None)!r}"
            for k, v in expect.items()
            if getattr(config, k, None) != v
        ]
        if wrong:
            raise UsageError(f"{args.src} is not the model --expect describes: " + "; ".join(wrong))
    model = load_bagel(
        args.src, device=device, dtype=dtype, image_size=args.image_size, vit_image_size=args.vit_image_size
    )
    # the prompts of real benchmarks are tokenised with BAGEL's own tokenizer: it travels with the weights
    save_model(model, args.out, extra_files=tokenizer_files(args.src))
    log.info("imported %s -> %s (%s, %s)", args.src, args.out, device, dtype)


def cmd_import_qwen_image(args) -> None:
    from .families.qwen_image import import_qwen_image

    device, dtype = _runtime(args)
    settings = parse_spec(args.settings, "--settings") if args.settings else None
    import_qwen_image(args.src, args.out, device=device, dtype=dtype, settings=settings)
    log.info("imported %s -> %s (%s, %s)", args.src, args.out, device, dtype)


def cmd_count_params(args) -> None:
    """Parameter counts per top-level module, on the meta device (nothing is allocated)."""
    import torch

    from .models.bagel import config_from_bagel, published_config
    from .models.configuration_mot import MoTConfig
    from .models.modeling_mot import MoTForUnifiedModel

    local = args.bagel or args.model_dir
    if not args.published and local and not Path(local).is_dir():  # never a Hub id: a local verb asks no server
        raise UsageError(f"{local}: no such model directory")
    if args.published:
        config = published_config()
    elif args.bagel:
        config = config_from_bagel(args.bagel)
    elif args.model_dir:
        config = MoTConfig.from_pretrained(args.model_dir, local_files_only=True)
    else:
        raise UsageError("name a model directory, --bagel DIR or --published")
    with torch.device("meta"):
        model = MoTForUnifiedModel(config)
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in model.named_children()}
    counts["total"] = sum(counts.values())
    print(json.dumps(counts, indent=2))


def _register_models(sub) -> None:
    from .sizes import (
        BAGEL_IMAGE_SIZE as IMAGE_SIZE,
    )  # torch-free: --help stays fast
    from .sizes import (
        BAGEL_VIT_IMAGE_SIZE as VIT_IMAGE_SIZE,
    )

    s = sub.add_parser(
        "import-bagel",
        parents=[runtime_options()],
        help="load a BAGEL-7B-MoT directory strictly and write it as a unisparse model directory",
    )
    s.add_argument(
        "--src",
        required=True,
        help="BAGEL directory (llm_config.json, vit_config.json, ema.safetensors, ae.safetensors, tokenizer files)",
    )
    s.add_argument("--out", required=True, help="model directory to write")
    s.add_argument(
        "--image-size", type=_positive, default=IMAGE_SIZE, help=f"side of generated images (default {IMAGE_SIZE})"
    )
    s.add_argument(
        "--vit-image-size",
        type=_positive,
        default=VIT_IMAGE_SIZE,
        help=f"largest side of understood images (default {VIT_IMAGE_SIZE})",
    )
    s.add_argument("--expect", help="sizes the checkpoint must have, e.g. the config's `model:` (JSON/YAML or @file)")
    s.set_defaults(func=cmd_import_bagel)

    s = sub.add_parser(
        "import-qwen-image",
        parents=[runtime_options()],
        help="load a diffusers Qwen/Qwen-Image snapshot strictly and write it as a unisparse model directory",
    )
    s.add_argument(
        "--src",
        required=True,
        help="snapshot directory (model_index.json, text_encoder/, transformer/, vae/, tokenizer/, scheduler/)",
    )
    s.add_argument("--out", required=True, help="model directory to write")
    s.add_argument("--settings", help="family settings, e.g. {image_size: 1024} (JSON/YAML or @file)")
    s.set_defaults(func=cmd_import_qwen_image)

    s = sub.add_parser("count-params", help="parameter counts per top-level module (meta device: no memory)")
    s.add_argument("model_dir", nargs="?", help="a unisparse model directory")
    s.add_argument("--bagel", help="a BAGEL directory (reads its config files and ae.safetensors' header)")
    s.add_argument("--published", action="store_true", help="BAGEL-7B-MoT's published sizes")
    s.set_defaults(func=cmd_count_params)


def cmd_artifacts(args) -> None:
    """The artifact scripts' steps (workflow/scripts/*_artifacts.sh); each exits with its own status."""
    if args.action == "check-recordable":
        from .records import check_run

        raise SystemExit(check_run(args.summary, args.config_args, args.results))
    if args.action == "verify-fetched":
        from .artifacts import dvc_remote, verify_fetched

        raise SystemExit(
            verify_fetched(
                args.cache, args.lock, pull_failed=args.pull_status != 0, remote=lambda: dvc_remote(args.remote)
            )
        )
    from .artifacts import restore_run_order

    restore_run_order(args.lock, args.metadata)


def _register_artifacts(sub) -> None:
    s = sub.add_parser(
        "artifacts",
        help="steps of recording and fetching a run's artifacts with DVC "
        "(workflow/scripts/record_artifacts.sh, fetch_artifacts.sh)",
    )
    steps = s.add_subparsers(dest="action", required=True)
    c = steps.add_parser(
        "check-recordable",
        help="exit 1 with one line (stdout) if the run in a 'snakemake --summary' "
        "cannot be recorded yet (unisparse.records)",
    )
    c.add_argument("--summary", required=True, help="a file holding the output of 'snakemake --summary'")
    c.add_argument("--config-args", default="", help="the run's config arguments as typed, e.g. ' --configfile X'")
    c.add_argument("--results", default="results", help="where temporaries of killed writers are looked for")
    c = steps.add_parser(
        "verify-fetched",
        help="check every file of dvc.lock's outs against its recorded md5 after "
        "'dvc pull'; exit 4 naming each that is not as recorded",
    )
    c.add_argument("--cache", required=True, help="the DVC cache directory ('dvc cache dir')")
    c.add_argument("--lock", default="dvc.lock", help="default: dvc.lock")
    c.add_argument("--remote", help="the DVC remote pulled from (default: the configured default remote)")
    c.add_argument("--pull-status", type=int, default=0, help="dvc pull's exit status (nonzero: its error is above)")
    c = steps.add_parser(
        "restore-run-order",
        help="give the pulled outputs the timestamps of the producer's run order (Snakemake's metadata records)",
    )
    c.add_argument("--lock", default="dvc.lock", help="default: dvc.lock")
    c.add_argument("--metadata", default=".snakemake/metadata", help="default: .snakemake/metadata")
    s.set_defaults(func=cmd_artifacts)


COMMANDS = {
    "probes": _register_probes,
    "moe": _register_moe,
    "data": _register_data,
    "checkpoint": _register_checkpoint,
    "models": _register_models,
    "artifacts": _register_artifacts,
}


def runtime_options() -> argparse.ArgumentParser:
    """--device / --dtype / --threads, taken by every verb that runs a model."""
    from .runtime import DEFAULTS, DTYPES

    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("runtime")
    g.add_argument(
        "--device",
        default=DEFAULTS["device"],
        type=_device,
        help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N",
    )
    g.add_argument(
        "--dtype",
        default=DEFAULTS["dtype"],
        choices=DTYPES,
        help="the model's parameter dtype (statistics and losses stay fp32)",
    )
    g.add_argument("--threads", type=_positive, help="torch intra-op threads (overrides the settings' threads)")
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unisparse", description=__doc__.splitlines()[0])
    p.add_argument("--log-file", help="also write the log here")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser(
        "train-tiny", parents=[runtime_options()], help="train the tiny default model on the shapes world"
    )
    s.add_argument("--model", help="model sizes (JSON/YAML or @file)")
    s.add_argument("--train", help="training settings (JSON/YAML or @file)")
    s.add_argument("--out", required=True, help="model directory to write")
    s.add_argument("--summary", help="JSON file for the training summary")
    s.add_argument("--checkpoint-dir", help="where to keep resumable checkpoints (removed on success)")
    s.set_defaults(func=cmd_train_tiny)

    s = sub.add_parser(
        "evaluate", parents=[runtime_options()], help="score a model directory on ShapesQA and ShapesGenEval"
    )
    s.add_argument("model_dir")
    s.add_argument("--spec", help="evaluation settings (JSON/YAML or @file)")
    s.add_argument("--meta", help="grid coordinates of this variant, stored with the metrics")
    s.add_argument("--out", required=True, help="metrics JSON to write")
    s.set_defaults(func=cmd_evaluate)

    for register in COMMANDS.values():
        register(sub)
    return p


#: the options naming what a verb writes (named when the system's error names no file)
OUTPUT_OPTIONS = ("out", "metrics", "summary", "checkpoint_dir")


#: errors of a write that the system reports without a file name (a failed ``write`` or ``close``)
WRITE_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def _outputs(args) -> list[str]:
    return [
        f"--{o.replace('_', '-')} {getattr(args, o)}" for o in OUTPUT_OPTIONS if isinstance(getattr(args, o, None), str)
    ]  # aggregate's `metrics` are its inputs (a list)


def os_error_line(e: OSError, args) -> str:
    """An OS error (a full disk, a file too large, a symlink loop, a missing file) as one line naming
    the path: the system's file name, else, for a failed write, the outputs the verb writes."""
    if e.filename is not None:
        line = f"{e.filename}: {e.strerror or e}"
        return line + (f" -> {e.filename2}" if e.filename2 is not None else "")
    if e.errno in WRITE_ERRNOS and _outputs(args):
        return f"{e.strerror or e} (while writing {', '.join(_outputs(args))})"
    return str(e)


def _safetensors_errors() -> tuple:
    """safetensors' own error class, where a verb imported it: its I/O errors (a full disk while a
    model is saved) are no OSError."""
    module = sys.modules.get("safetensors")
    error = getattr(module, "SafetensorError", None)
    return (error,) if isinstance(error, type) else ()


def error_line(e: Exception, args) -> str:
    """The one line a refused or failed verb ends with."""
    if isinstance(e, OSError):
        return os_error_line(e, args)
    line = str(e)
    if isinstance(e, _safetensors_errors()) and "I/O error" in line and _outputs(args):
        line += f" (while writing {', '.join(_outputs(args))})"
    return line


def main(argv: list[str] | None = None) -> None:
    """Run one verb. A bad input (value, file, corrupted artifact) or an OS error (a full disk) ends
    with one line naming it and exit status 2; set UNISPARSE_DEBUG=1 for the traceback."""
    import os

    from .io import IntegrityError

    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_file)
    try:
        args.func(args)
    except (UsageError, IntegrityError, ValueError, OSError, *_safetensors_errors()) as e:
        if os.environ.get("UNISPARSE_DEBUG"):
            raise
        parser.exit(2, f"unisparse {args.command}: error: {' '.join(error_line(e, args).splitlines())}\n")
    finally:
        dist = sys.modules.get("torch.distributed")  # only where a verb imported torch
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
