"""Derived models stored as what they add to their parent: a delta directory.

A depth-pruned model differs from its parent by the tensors it lost, a width-pruned one by the MLP
rows and columns it kept, an untuned MoE by how the dense neurons went into experts, a tuned model
by its tuned tensors. A delta directory holds the derived model's every file but its weights, plus

* ``delta.json``: the parent (its path relative to this directory and the sha256 of its manifest,
  ``io.directory_digest``), the sha256 of the derived weights (``tensors_digest``), and for every
  tensor how to make it: ``ref`` (the parent's tensor of that name, unchanged), ``slices`` (each 2-D
  slice a gather of one parent tensor's rows or columns, by stored indices) or ``stored``;
* ``delta.safetensors``: the gather indices (int64) and the stored tensors.

The matching is by content, not by algorithm: every row and column of every parent tensor is hashed
once and each derived slice is looked up, so no algorithm, family or weight name is known here; the
result is exact by construction and verified against the recorded digest when it is materialised.
``materialise`` writes the standalone directory (the form to share or serve); ``load_family`` reads
a delta directory by materialising it to a temporary directory first. Safetensors and JSON only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .io import MANIFEST, IntegrityError, atomic_path, directory_digest, tensors_digest, write_manifest

log = logging.getLogger(__name__)

DELTA_FILE, DELTA_TENSORS = "delta.json", "delta.safetensors"
FORMAT = 1


def is_delta_dir(path) -> bool:
    return (Path(path) / DELTA_FILE).is_file()


def _files(model_dir, layout):
    from .sharding import WeightFiles

    return WeightFiles(model_dir, layout)


def _row_hashes(t: torch.Tensor) -> list[bytes]:
    data = t.contiguous().view(torch.uint8).numpy()
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in data]


class ParentIndex:
    """Every row and column of the parent's 2-D tensors by content hash, built once."""

    def __init__(self, files):
        self.files = files
        self.whole: dict[str, bytes] = {}
        self.rows: dict[tuple, dict[bytes, tuple[str, int]]] = {}
        for name in sorted(files.entries):
            t = files.rows(name)
            self.whole[name] = hashlib.blake2b(t.contiguous().view(torch.uint8).numpy().tobytes()).digest()
            if t.dim() == 2 and t.shape[0] > 1 and t.shape[1] > 1:
                for axis, m in ((0, t), (1, t.t())):
                    table = self.rows.setdefault((axis, m.shape[1], str(t.dtype)), {})
                    for i, key in enumerate(_row_hashes(m)):
                        table.setdefault(key, (name, i))

    def gather(self, s: torch.Tensor):
        """``(axis, parent names, which, indices)`` such that row (``axis`` 0) or column (1) ``i`` of
        the 2-D slice ``s`` is row / column ``indices[i]`` of parent ``names[which[i]]``, or None.
        (A fused tensor, e.g. gate and up stacked, gathers from several parents.)"""
        for axis, m in ((0, s), (1, s.t())):
            table = self.rows.get((axis, m.shape[1], str(s.dtype)))
            if not table:
                continue
            found = [table.get(key) for key in _row_hashes(m)]
            if all(found):
                names = sorted({f[0] for f in found})
                which = torch.tensor([names.index(f[0]) for f in found], dtype=torch.int64)
                return axis, names, which, torch.tensor([f[1] for f in found], dtype=torch.int64)
        return None


def write_delta(full_dir, parent_dir, out_dir, layout) -> dict:
    """The delta form of the model in ``full_dir`` (every file but its weights, ``delta.json``,
    ``delta.safetensors``, a manifest) written atomically to ``out_dir``; ``layout``: the family's
    ``weight_layout`` (where its files keep which tensors). Returns the counts of each kind."""
    full_dir, parent_dir, out_dir = Path(full_dir), Path(parent_dir), Path(out_dir)
    parent_digest = directory_digest(parent_dir)
    if parent_digest is None:
        raise IntegrityError(f"{parent_dir} has no {MANIFEST}: a delta needs a parent identified by its content")
    with tempfile.TemporaryDirectory(prefix="unisparse-parent-") as scratch:
        source = materialise(parent_dir, Path(scratch) / "parent", layout) if is_delta_dir(parent_dir) else parent_dir
        return _write_delta(full_dir, parent_dir, source, parent_digest, out_dir, layout)


def _write_delta(full_dir: Path, parent_dir: Path, source: Path, parent_digest: str, out_dir: Path, layout) -> dict:
    """``write_delta`` with the parent's tensors read from ``source`` (the parent, or its standalone
    copy where the parent is a delta itself)."""
    from safetensors.torch import save_file

    derived, parent = _files(full_dir, layout), _files(source, layout)
    index = ParentIndex(parent)
    plan, stored, kinds = {}, {}, {"ref": 0, "slices": 0, "stored": 0}
    weight_files = set()
    for name in sorted(derived.entries):
        weight_files.add(derived.entries[name][0])
        t = derived.rows(name)
        if name in parent.entries and parent.entries[name][2:] == (tuple(t.shape), derived.entries[name][3]):
            whole = hashlib.blake2b(t.contiguous().view(torch.uint8).numpy().tobytes()).digest()
            if whole == index.whole[name]:
                plan[name], kinds["ref"] = {"ref": name}, kinds["ref"] + 1
                continue
        slices = None
        if t.dim() >= 2 and t.numel():
            flat = t.reshape(-1, *t.shape[-2:])
            slices = [index.gather(s) for s in flat]
            slices = slices if all(slices) else None
        if slices:
            entry = []
            for i, (axis, sources, which, idx) in enumerate(slices):
                key = f"index.{name}.{i}"
                stored[key] = idx
                entry.append({"from": sources, "axis": axis, "index": key})
                if len(sources) > 1:
                    stored[f"which.{name}.{i}"] = which
                    entry[-1]["which"] = f"which.{name}.{i}"
            plan[name], kinds["slices"] = {"slices": entry, "shape": list(t.shape)}, kinds["slices"] + 1
        else:
            stored[f"tensor.{name}"] = t.contiguous()
            plan[name], kinds["stored"] = {"stored": f"tensor.{name}"}, kinds["stored"] + 1
    digest = tensors_digest((n, derived.rows(n)) for n in sorted(derived.entries))
    with atomic_path(out_dir, is_dir=True) as tmp:
        for path in sorted(full_dir.rglob("*")):
            rel = path.relative_to(full_dir)
            if path.is_file() and path not in weight_files and rel.name != MANIFEST and not _is_index(rel):
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, tmp / rel)
        save_file(stored, str(tmp / DELTA_TENSORS), metadata={"format": "pt"})
        meta = {
            "format": FORMAT,
            "parent": {"path": os.path.relpath(parent_dir.resolve(), out_dir.resolve()), "sha256": parent_digest},
            "tensors_sha256": digest,
            "tensors": plan,
        }
        (tmp / DELTA_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        write_manifest(tmp)
    log.info("wrote %s as a delta of %s: %s", out_dir, parent_dir, kinds)
    return kinds


def _is_index(rel: Path) -> bool:
    return rel.name.endswith(".safetensors.index.json")


def _gathered(parent, extra, entry: dict) -> torch.Tensor:
    """One 2-D slice: rows (axis 0) or columns (1) of one or several parent tensors, in order."""
    axis, index = entry["axis"], extra.get_tensor(entry["index"])
    sources = [parent.rows(n) for n in entry["from"]]
    if len(sources) == 1:
        return sources[0].index_select(axis, index)
    which = extra.get_tensor(entry["which"])
    pieces = [sources[int(w)].select(axis, int(i)) for w, i in zip(which.tolist(), index.tolist())]
    return torch.stack(pieces, dim=axis)


def parent_of(delta_dir) -> Path:
    meta = json.loads((Path(delta_dir) / DELTA_FILE).read_text())
    return (Path(delta_dir) / meta["parent"]["path"]).resolve()


def materialise(delta_dir, out_dir, layout) -> Path:
    """The standalone model directory of a delta (recursively, where its parent is a delta too):
    every tensor made from the parent and checked against the recorded digest; a parent whose
    manifest differs from the one recorded is refused. ``layout``: as for ``write_delta``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from .io import verify_model_dir
    from .sharding import renamed

    delta_dir, out_dir = Path(delta_dir), Path(out_dir)
    verify_model_dir(delta_dir)
    meta = json.loads((delta_dir / DELTA_FILE).read_text())
    if meta.get("format") != FORMAT:
        raise IntegrityError(f"{delta_dir}/{DELTA_FILE}: unknown delta format {meta.get('format')!r}")
    parent_dir = parent_of(delta_dir)
    if not parent_dir.is_dir():
        raise FileNotFoundError(f"{delta_dir} is a delta of {parent_dir}, which does not exist")
    if directory_digest(parent_dir) != meta["parent"]["sha256"]:
        raise IntegrityError(
            f"{delta_dir} is a delta of {parent_dir} with manifest sha256 {meta['parent']['sha256'][:12]}..., but "
            f"that directory now has {str(directory_digest(parent_dir))[:12]}...: its parent changed; rebuild it"
        )
    with tempfile.TemporaryDirectory(prefix="unisparse-parent-") as scratch:
        source = parent_dir
        if is_delta_dir(parent_dir):
            source = materialise(parent_dir, Path(scratch) / "parent", layout)
        parent = _files(source, layout)
        extra = safe_open(str(delta_dir / DELTA_TENSORS), framework="pt")
        tensors = {}
        for name, how in meta["tensors"].items():
            if "ref" in how:
                tensors[name] = parent.rows(how["ref"])
            elif "stored" in how:
                tensors[name] = extra.get_tensor(how["stored"])
            else:
                tensors[name] = torch.stack([_gathered(parent, extra, e) for e in how["slices"]]).reshape(how["shape"])
        if tensors_digest(sorted(tensors.items())) != meta["tensors_sha256"]:
            raise IntegrityError(f"{delta_dir}: the materialised weights do not match the recorded sha256")
        with atomic_path(out_dir, is_dir=True) as tmp:
            for path in sorted(delta_dir.rglob("*")):
                rel = path.relative_to(delta_dir)
                if path.is_file() and rel.name not in (DELTA_FILE, DELTA_TENSORS, MANIFEST):
                    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(path, tmp / rel)
            for prefix, sub, stem, renames in layout:
                part = {
                    renamed(n[len(prefix) :], renames): t.contiguous()
                    for n, t in tensors.items()
                    if n.startswith(prefix)
                }
                if part:
                    (tmp / sub).mkdir(parents=True, exist_ok=True)
                    save_file(part, str(tmp / sub / f"{stem}.safetensors"), metadata={"format": "pt"})
                    tensors = {n: t for n, t in tensors.items() if not n.startswith(prefix)}
            write_manifest(tmp)
    return out_dir
