"""Write the shapes world's prompts and splits as GenEval-style metadata files (kept in data/), so
the exact benchmark a score refers to is published with it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..io import atomic_path
from . import shapes


def geneval_metadata() -> list[dict]:
    rows = []
    for p in shapes.all_gen_prompts():
        rows.append(
            {
                "tag": p.tag,
                "prompt": p.text,
                "split": shapes.gen_split(p),
                "include": [dataclasses.asdict(r) for r in p.include],
                "exclude": [dataclasses.asdict(r) for r in p.exclude],
            }
        )
    return rows


def export_benchmarks(out_dir) -> list[Path]:
    out = Path(out_dir) / "shapes_geneval_metadata.jsonl"
    with atomic_path(out) as tmp:
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in geneval_metadata()))
    return [out]
