"""Calibration inputs of the real benchmarks, disjoint from their evaluation sets: generation prompts
in GenEval's templates that are not among its 553 (``data/geneval/calibration_metadata.jsonl``), and
yes/no questions from POPE on images MME does not use. The calibration pass (``calibrate``) streams
whatever it is given; this module, above it, gives it these (the shapes world's split is its default)."""

from __future__ import annotations

from ..benchmarks import check_benchmarks


def calibration_inputs(task: str, spec: dict, family):
    """``(batches, data)`` for ``calibrate.run_calibration(inputs=...)``, or None when the task's
    benchmark is the shapes world's (the calibration pass then uses the world's own split)."""
    bench = check_benchmarks(spec.get("benchmarks"))[task]
    tokenizer = family.tokenizer
    bs = int(spec["batch_size"])
    if bench == "mme":
        from .mme import calibration_set, prepare_batch

        items, info = calibration_set(spec)
        batches = (
            prepare_batch(
                [im for im, _ in items[i : i + bs]], [q for _, q in items[i : i + bs]], tokenizer, family.image_geometry
            )
            for i in range(0, len(items), bs)
        )
        return batches, {"split": "calib", "source": info}
    if bench == "geneval":
        from .geneval import calibration_pairs

        pairs = calibration_pairs(spec)
        batches = (
            ([tokenizer.encode(t) for t, _ in pairs[i : i + bs]], [s for _, s in pairs[i : i + bs]])
            for i in range(0, len(pairs), bs)
        )
        return batches, {
            "split": "calib",
            "source": "data/geneval/calibration_metadata.jsonl",
            "gen_seed": spec["gen_seed"],
            "max_prompts_per_tag": spec["max_prompts_per_tag"],
        }
    return None
