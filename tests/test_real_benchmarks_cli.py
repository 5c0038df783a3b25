"""The real benchmarks through the CLI verbs the rules call: a BAGEL-layout checkpoint (tiny, imported
strictly) calibrated on GenEval-style prompts and POPE, evaluated on GenEval and MME, with tiny random
Mask2Former and CLIP models and tiny MME/POPE datasets in a temporary Hugging Face cache. Offline."""

import json

import pytest

from helpers.benchmarks import (
    CLIP_COMMIT,
    COMMIT_MME,
    COMMIT_POPE,
    DETECTOR_COMMIT,
    POPE_COLUMNS,
    cache_repo,
    mme_files,
    mme_rows,
    parquet_bytes,
    pope_rows,
    tiny_clip,
    tiny_detector,
    write_dataset,
)
from unisparse.cli import main
from unisparse.evaluate import geneval as g

REAL = {
    "benchmarks": {"gen": "geneval", "und": "mme"},
    "num_steps": 2,
    "cfg_scale": 4.0,
    "cfg_renorm": "global",
    "samples_per_prompt": 1,
    "max_prompts_per_tag": 1,
    "batch_size": 4,
    "threads": 1,
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    tiny_detector(root / "saved-detector", "cat")
    tiny_clip(root / "saved-clip")
    hub = root / "hub"
    cache_repo(hub, g.DEFAULT_DETECTOR, DETECTOR_COMMIT, root / "saved-detector")
    cache_repo(hub, g.DEFAULT_CLIP, CLIP_COMMIT, root / "saved-clip")
    write_dataset(hub, "lmms-lab/MME", COMMIT_MME, mme_files(mme_rows()))
    rows = pope_rows()
    write_dataset(
        hub, "lmms-lab/POPE", COMMIT_POPE, {"data/test-00000-of-00001.parquet": parquet_bytes(rows, POPE_COLUMNS)}
    )
    return hub


@pytest.fixture
def offline(cache, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    from unisparse.models.bagel import write_fake_checkpoint

    root = tmp_path_factory.mktemp("bagel")
    write_fake_checkpoint(root / "src")
    main(
        [
            "import-bagel",
            "--src",
            str(root / "src"),
            "--out",
            str(root / "dense"),
            "--dtype",
            "float32",
            "--image-size",
            "64",
            "--vit-image-size",
            "28",
        ]
    )
    return root / "dense"


@pytest.mark.parametrize("task", ["und", "gen"])
def test_calibration_streams_the_real_calibration_splits(offline, dense, tmp_path, task):
    out = tmp_path / f"{task}.safetensors"
    spec = {**REAL, "calib_items": 4}
    main(["calibrate", str(dense), "--task", task, "--spec", json.dumps(spec), "--out", str(out)])
    side = json.loads((tmp_path / f"{task}.safetensors.json").read_text())
    data = side["data"]
    assert data["split"] == "calib"
    if task == "und":  # POPE, none of its images one of MME's (the fixture plants one)
        assert data["source"]["repo_id"] == "lmms-lab/POPE" and data["qa_items"] == 4
        assert data["source"]["excluded_mme_images"]
    else:  # GenEval-style prompts that are not GenEval's: 5 tags (no single-object prompt is left over)
        assert data["source"].endswith("calibration_metadata.jsonl") and data["prompts"] == 5 == data["images"]
        assert side["sampler"]["cfg_renorm"] == "global" and side["sampler"]["num_steps"] == 2


def test_evaluate_scores_geneval_and_mme(offline, dense, tmp_path):
    out = tmp_path / "metrics" / "dense.json"
    main(["evaluate", str(dense), "--spec", json.dumps({**REAL, "mme_max_images_per_subtask": 1}), "--out", str(out)])
    metrics = json.loads(out.read_text())
    gen, und = metrics["generation"], metrics["understanding"]
    assert set(gen["per_tag"]) == {"single_object", "two_object", "counting", "colors", "position", "color_attr"}
    assert gen["n_images"] == 6 and 0 <= gen["overall"] <= 1 and "per_image" not in gen
    folder = tmp_path / "metrics" / "dense.d" / "geneval"
    prompts = sorted(d for d in folder.iterdir() if d.is_dir())  # GenEval's layout: one folder per metadata line
    assert len(prompts) == 6 and all(d.name.isdigit() and len(d.name) == 5 for d in prompts)
    assert all((d / "metadata.jsonl").is_file() and (d / "samples" / "0000.png").is_file() for d in prompts)
    assert len((folder / "results.jsonl").read_text().splitlines()) == 6
    assert und["overall"] == und["total"] == und["perception"] + und["cognition"]
    assert {"existence", "OCR", "code_reasoning", "text_translation"} <= set(und["per_subtask"])
    assert all(r["pred"] in ("yes", "no", "other") for r in und["per_item"])
    assert metrics["eval"]["benchmarks"] == REAL["benchmarks"]
    assert metrics["latency"]["gen_seconds_per_image"] > 0
    # the tables name the real benchmarks and hold one numeric row per score (tags, subtasks flattened)
    from unisparse.tables import aggregate

    df = aggregate([out], tmp_path / "probes.csv")
    assert set(df["benchmark"]) == {"GenEval", "MME"}
    gen_rows = df[df.benchmark == "GenEval"].set_index("metric")
    assert {"overall", "colors", "position"} <= set(gen_rows.index)
    assert gen_rows.loc["overall", "value"] == gen["overall"] and gen_rows.loc["overall", "se"] == gen["se"]["overall"]
    mme_rows_ = df[df.benchmark == "MME"].set_index("metric")
    assert mme_rows_.loc["OCR", "value"] == und["per_subtask"]["OCR"]["score"]
    assert {"total", "perception", "cognition", "overall"} <= set(mme_rows_.index)
    assert df["value"].map(lambda v: isinstance(v, (int, float))).all()


def test_shapes_tokenizer_cannot_run_mme(dense, tmp_path, offline):
    """The tiny default has no text tokenizer: MME is refused with a message, not scored on garbage."""
    from unisparse.evaluate import evaluate_model
    from unisparse.models.loading import load_model

    with pytest.raises(ValueError, match="text tokenizer"):
        evaluate_model(load_model(dense), {**REAL, "benchmarks": {"und": "mme", "gen": "shapes_geneval"}})
