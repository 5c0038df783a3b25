"""Derived models stored as deltas of their parent (issue 24): every kind the pipeline writes (depth,
width, untuned MoE, tuned MoE, tuned control) loads bit-identical to its full copy, costs a small
share of one, materialises to a standalone directory, and refuses a parent whose content changed."""

import json
from pathlib import Path

import pytest
import torch

from helpers.cli import cli
from helpers.models import save_calibration, save_dense
from unisparse.deltas import DELTA_FILE, DELTA_TENSORS, is_delta_dir, materialise
from unisparse.families import layout_of, load_family
from unisparse.io import IntegrityError, save_model

TUNE = {"steps": 3, "batch_gen": 4, "threads": 1}


@pytest.fixture(scope="module")
def parents(tmp_path_factory):
    root = tmp_path_factory.mktemp("deltas")
    model = save_dense(root / "dense")
    save_calibration(model, root / "dense", root / "gen.safetensors")
    save_calibration(model, root / "dense", root / "und.safetensors", task="und")
    # the MoE every tuned variant starts from, itself written whole
    cli("partition", root / "dense", "--calibration", root / "gen.safetensors", "--component", "gen",
        "--num-experts", "4", "--top-k", "2", "--dense-layers", "none", "--out", root / "moe")  # fmt: skip
    return root


KINDS = {
    "depth": ("dense", ["prune-depth", "--calibration", "und.safetensors", "--component", "und", "--drop", "1"]),
    "width": ("dense", ["prune-width", "--component", "gen", "--keep-ratio", "0.5", "--score", "weight"]),
    "moe": (
        "dense",
        [
            "partition",
            "--calibration",
            "gen.safetensors",
            "--component",
            "gen",
            "--num-experts",
            "4",
            "--top-k",
            "2",
            "--dense-layers",
            "none",
        ],
    ),  # fmt: skip
    "tuned-moe": ("moe", ["tune-moe", "--mode", "full", "--spec", json.dumps(TUNE)]),
    "tuned-router": ("moe", ["tune-moe", "--mode", "frozen", "--spec", json.dumps(TUNE)]),
    "tuned-control": ("dense", ["tune", "--mode", "full", "--spec", json.dumps(TUNE)]),
}


def derive(root: Path, kind: str, store: str) -> Path:
    parent, argv = KINDS[kind]
    verb, *rest = argv
    rest = [str(root / a) if a.endswith(".safetensors") else a for a in rest]
    out = root / f"{kind}-{store}"
    cli(verb, root / parent, *rest, "--out", out, "--store", store)
    return out


def sizes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*.safetensors"))


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_delta_loads_bit_identical_to_the_full_copy(parents, kind):
    full, delta = derive(parents, kind, "full"), derive(parents, kind, "delta")
    assert is_delta_dir(delta) and not is_delta_dir(full)
    assert {p.name for p in delta.glob("*.safetensors")} == {DELTA_TENSORS}
    a, b = load_family(full).model.state_dict(), load_family(delta).model.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    plan = json.loads((delta / DELTA_FILE).read_text())["tensors"]
    how = {k: sum(1 for v in plan.values() if k in v) for k in ("ref", "slices", "stored")}
    share = sizes(delta) / sizes(full)
    print(f"{kind}: {how}; delta {sizes(delta)} bytes = {share:.3f} of the full copy")
    if kind in ("depth", "width", "moe", "tuned-router"):
        assert share < 0.25  # references, gather indices and (routers) a few small tensors
    else:
        assert how["stored"] > 0 and share < 0.9  # the tuned MLPs only
    standalone = materialise(delta, parents / f"{kind}-standalone", layout_of(delta))
    assert not is_delta_dir(standalone)
    c = load_family(standalone).model.state_dict()
    assert all(torch.equal(a[n], c[n]) for n in a)


def test_a_delta_of_a_delta_materialises_through_both(parents):
    moe = derive(parents, "moe", "delta")
    cli("tune-moe", moe, "--mode", "frozen", "--spec", json.dumps(TUNE), "--out", parents / "chain", "--store", "delta")
    want = load_family(derive(parents, "tuned-router", "full")).model.state_dict()
    got = load_family(parents / "chain").model.state_dict()
    assert all(torch.equal(want[n], got[n]) for n in want)
    # indexed against the materialised parent: only the tuned routers are stored
    plan = json.loads((parents / "chain" / DELTA_FILE).read_text())["tensors"]
    assert sum("stored" in v for v in plan.values()) == 3 and sizes(parents / "chain") < 0.05 * sizes(
        parents / "tuned-router-full"
    )


def test_a_parent_whose_content_changed_is_refused(parents, tmp_path):
    import shutil

    shutil.copytree(parents / "dense", tmp_path / "dense")
    shutil.copy(parents / "und.safetensors", tmp_path / "und.safetensors")
    shutil.copy(parents / "und.safetensors.json", tmp_path / "und.safetensors.json")
    delta = derive(tmp_path, "depth", "delta")
    load_family(delta)  # fine while the parent is as recorded
    family = load_family(tmp_path / "dense")
    with torch.no_grad():
        next(family.model.parameters()).add_(1e-3)
    shutil.rmtree(tmp_path / "dense")
    save_model(family.model, tmp_path / "dense")
    with pytest.raises(IntegrityError, match="its parent changed"):
        load_family(delta)
    shutil.rmtree(tmp_path / "dense")
    with pytest.raises(FileNotFoundError, match="which does not exist"):
        load_family(delta)
