"""Atomic artifact writing: a file or model directory appears under its final name complete or not at all."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


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
        if final.is_dir() and not final.is_symlink():
            trash = final.parent / f".{final.name}.old-{os.getpid()}"
            os.replace(final, trash)
            os.replace(target, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(target, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path):
    return json.loads(Path(path).read_text())


def save_model(model, out_dir) -> None:
    """``save_pretrained`` (safetensors) into a temporary directory, then rename into place."""
    with atomic_path(out_dir, is_dir=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)


def load_model(model_dir, **kwargs):
    """Load a model directory written by the pipeline (safetensors only, never pickle)."""
    from .models import MoTForUnifiedModel

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"{model_dir} is not a model directory (no config.json)")
    if not any(model_dir.glob("*.safetensors")):
        raise FileNotFoundError(f"{model_dir} holds no .safetensors weights")
    model = MoTForUnifiedModel.from_pretrained(model_dir, use_safetensors=True, **kwargs)
    model.eval()
    return model
