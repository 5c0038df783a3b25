"""The ``unisparse`` command line: one verb per pipeline stage, each a thin call of the library.

Structured options (a config section) are passed as JSON (``--spec '{"steps": 100}'``) or as a
JSON/YAML file (``--spec @file.yaml``), so a Snakemake rule hands over exactly its config values.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import yaml

log = logging.getLogger("unisparse")


def parse_spec(text: str | None) -> dict:
    if not text:
        return {}
    if text.startswith("@"):
        text = Path(text[1:]).read_text()
    spec = yaml.safe_load(text)
    if not isinstance(spec, dict):
        raise SystemExit(f"error: a spec must be a mapping, got {type(spec).__name__}")
    return spec


def setup_logging(log_file: str | None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="w"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", handlers=handlers, force=True)


def cmd_train_tiny(args) -> None:
    from .io import write_json
    from .train import train_tiny

    summary = train_tiny(parse_spec(args.model), parse_spec(args.train), args.out, progress=not args.no_progress)
    if args.summary:
        write_json(args.summary, summary)


def cmd_evaluate(args) -> None:
    from .evaluate import evaluate_model_dir
    from .io import write_json

    metrics = evaluate_model_dir(args.model_dir, parse_spec(args.spec), progress=not args.no_progress)
    if args.meta:
        metrics["variant"] = parse_spec(args.meta)
    write_json(args.out, metrics)
    print(json.dumps({"understanding": metrics["understanding"]["overall"], "generation": metrics["generation"]["overall"]}))


COMMANDS = {}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unisparse", description=__doc__.splitlines()[0])
    p.add_argument("--log-file", help="also write the log here")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("train-tiny", help="train the tiny default model on the shapes world")
    s.add_argument("--model", help="model sizes (JSON/YAML or @file)")
    s.add_argument("--train", help="training settings (JSON/YAML or @file)")
    s.add_argument("--out", required=True, help="model directory to write")
    s.add_argument("--summary", help="JSON file for the training summary")
    s.set_defaults(func=cmd_train_tiny)

    s = sub.add_parser("evaluate", help="score a model directory on ShapesQA and ShapesGenEval")
    s.add_argument("model_dir")
    s.add_argument("--spec", help="evaluation settings (JSON/YAML or @file)")
    s.add_argument("--meta", help="grid coordinates of this variant, stored with the metrics")
    s.add_argument("--out", required=True, help="metrics JSON to write")
    s.set_defaults(func=cmd_evaluate)

    for register in COMMANDS.values():
        register(sub)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_file)
    args.func(args)


if __name__ == "__main__":
    main()
