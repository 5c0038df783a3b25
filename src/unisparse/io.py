"""Artifact files: written atomically, with the user's permissions, carrying content hashes.

A file or model directory appears under its final name complete or not at all. Model directories
carry a ``SHA256SUMS`` manifest (``sha256sum -c`` format) written at save and verified at load, so a
flipped byte is an error naming the file, not a silently different model; ``directory_digest`` (the
hash of that manifest) identifies a model directory's content in the records of derived artifacts
(calibration sidecars, tuning checkpoints).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

MANIFEST = "SHA256SUMS"
#: config entries that say where or with what a model was loaded, not what it is
VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "_commit_hash")


class IntegrityError(ValueError):
    """An artifact whose content does not match its recorded hash, or a model whose files do not
    match its config (missing, unexpected or mis-shaped tensors)."""


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _apply_umask(path: Path) -> None:
    """Give a finished temporary artifact the modes a plain ``open``/``mkdir`` would have given it
    (mkdtemp and some writers use 0700/0600, which hides artifacts from the rest of a group)."""
    mask = _umask()
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o777 & ~mask)
            for f in files:
                os.chmod(os.path.join(root, f), 0o666 & ~mask)
        os.chmod(path, 0o777 & ~mask)
    elif path.exists():
        os.chmod(path, 0o666 & ~mask)


@contextmanager
def atomic_path(final: str | os.PathLike, is_dir: bool = False):
    """Yield a temporary sibling path; on success rename it to ``final`` (replacing what was there).

    The temporary lives in the same directory so the rename is atomic on one filesystem; on error it
    is removed and ``final`` is left untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    target = tmp if is_dir else tmp / final.name
    try:
        yield target
        _apply_umask(target)
        if is_dir:
            _replace_dir(target, final, trash=final.parent / f".{final.name}.old-{tmp.name}")
        else:
            os.replace(target, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _replace_dir(target: Path, final: Path, trash: Path, attempts: int = 100) -> None:
    """Rename directory ``target`` to ``final``, moving an existing ``final`` aside first. Another
    writer may put its own ``final`` in place between the two renames: then move that aside too and
    retry, so concurrent writers end with one complete directory (the last one's) and no error.
    What was moved aside is deleted only once ``target`` is in place, so an interrupt between the two
    renames leaves the previous directory complete under its ``trash`` name (see ``aside_copies``)."""
    moved = []
    for i in range(attempts):
        try:
            os.rename(target, final)  # fails while a non-empty ``final`` exists
            break
        except OSError:
            if not final.exists():
                raise
        aside = trash.with_name(f"{trash.name}-{i}")
        try:
            os.rename(final, aside)
            moved.append(aside)
        except FileNotFoundError:
            continue  # another writer moved it: retry
    else:
        raise OSError(f"could not replace {final}: other writers kept replacing it")
    for aside in moved:
        shutil.rmtree(aside, ignore_errors=True)


def aside_copies(final: str | os.PathLike) -> list[Path]:
    """Earlier versions of directory ``final`` that an interrupted ``atomic_path`` left moved aside,
    newest first: the fallback when ``final`` itself is missing."""
    final = Path(final)
    copies = [p for p in final.parent.glob(f".{final.name}.old-*") if p.is_dir()]
    return sorted(copies, key=lambda p: p.stat().st_mtime, reverse=True)


def write_json(path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path):
    return json.loads(Path(path).read_text())


def sha256_file(path, on_block=None) -> str:
    """sha256 of a file, streamed in 16 MiB blocks; ``on_block(n)`` is told each block's size (a
    progress bar's ``update``)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
            if on_block is not None:
                on_block(len(block))
    return h.hexdigest()


def write_manifest(directory) -> None:
    """``SHA256SUMS`` of every file in ``directory`` (recursively), sorted by path."""
    directory = Path(directory)
    lines = [f"{sha256_file(p)}  {p.relative_to(directory).as_posix()}\n"
             for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST]
    (directory / MANIFEST).write_text("".join(lines))


def verify_manifest(directory) -> bool:
    """Check every file against ``SHA256SUMS``; False when there is no manifest (nothing to verify)."""
    directory = Path(directory)
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return False
    recorded = {}
    for line in manifest.read_text().splitlines():
        digest, _, name = line.partition("  ")
        recorded[name] = digest
    present = {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST}
    bad = [f"{name} (missing)" for name in sorted(set(recorded) - present)]
    bad += [f"{name} (not in {MANIFEST})" for name in sorted(present - set(recorded)) if name.endswith((".safetensors", ".json"))]
    bad += [f"{name} (content differs from its recorded sha256)" for name in sorted(set(recorded) & present)
            if sha256_file(directory / name) != recorded[name]]
    if bad:
        raise IntegrityError(f"{directory} is corrupted: " + "; ".join(bad))
    return True


def directory_digest(directory) -> str | None:
    """sha256 of a model directory's manifest: one hash for its whole content (None without one)."""
    manifest = Path(directory) / MANIFEST
    return hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None


def _configs(model) -> dict:
    """The model's config as a dict without volatile entries; a module that has none (a family's
    container of several models) gives its children's, by name."""
    def clean(config) -> dict:
        data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        return {k: v for k, v in data.items() if k not in VOLATILE_CONFIG_KEYS}

    if hasattr(model, "config"):
        return clean(model.config)
    return {name: clean(child.config) for name, child in model.named_children() if hasattr(child, "config")}


def state_digest(model) -> str:
    """sha256 of a model's config and every tensor (name, dtype, shape, bytes) as it is in memory:
    identifies the input of a run whose model never touched a file (library use)."""
    import torch

    h = hashlib.sha256(json.dumps(_configs(model), sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_model(model, out_dir, extra_files=()) -> None:
    """``save_pretrained`` (safetensors) plus ``SHA256SUMS`` into a temporary directory, then rename.
    ``extra_files`` (e.g. tokenizer files) are copied in and recorded in the manifest too."""
    with atomic_path(out_dir, is_dir=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        for path in extra_files:
            shutil.copyfile(path, Path(tmp) / Path(path).name)
        write_manifest(tmp)


def safetensors_shapes(path, prefix: str = "") -> dict[str, tuple]:
    """{prefix + tensor name: shape} of a safetensors file, from its header alone (no tensor is read)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {prefix + k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def check_weights_match(model_dir, model) -> None:
    """Every tensor in the files lands in exactly one parameter of the right shape, and every
    parameter is filled; otherwise an error listing the keys. Reads headers only."""
    stored = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        for key, shape in safetensors_shapes(path).items():
            if key in stored:
                raise IntegrityError(f"{model_dir}: tensor {key} is stored twice")
            stored[key] = shape
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = weight_mismatches(stored, expected)
    if problems:
        raise IntegrityError(f"{model_dir}: weights do not match config.json: " + "; ".join(problems))


def weight_mismatches(stored: dict, expected: dict) -> list[str]:
    """Missing, unexpected and mis-shaped tensors between ``stored`` and ``expected`` ({name: shape}),
    each a message listing the keys (empty when every stored tensor fills exactly one parameter)."""
    problems = []
    for what, keys in (("missing", sorted(set(expected) - set(stored))), ("unexpected", sorted(set(stored) - set(expected)))):
        if keys:
            problems.append(f"{len(keys)} {what} tensor(s): {_listing(keys)}")
    shapes = [f"{k} {list(stored[k])} (config wants {list(expected[k])})" for k in sorted(set(stored) & set(expected))
              if stored[k] != expected[k]]
    if shapes:
        problems.append(f"{len(shapes)} mis-shaped tensor(s): {_listing(shapes)}")
    return problems


def _listing(items, limit: int = 8) -> str:
    return ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
