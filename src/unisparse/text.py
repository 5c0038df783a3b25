"""Text <-> token ids for a model: the shapes world's word vocabulary (the tiny default) or the
tokenizer that travels with a model directory (``tokenizer.json``: BAGEL's Qwen2 tokenizer, written
there by ``unisparse import-bagel``). Benchmarks tokenise through this, never through a world directly,
so the same evaluator serves both."""

from __future__ import annotations

from pathlib import Path

from .worlds import shapes

TOKENIZER_FILE = "tokenizer.json"
#: the files of a Hugging Face tokenizer that travel with a model directory (import, prune, partition, tune)
TOKENIZER_FILES = (TOKENIZER_FILE, "tokenizer_config.json", "vocab.json", "merges.txt")


class ShapesTokenizer:
    """The shapes world's whitespace vocabulary (``worlds.shapes.VOCAB``)."""

    name = "shapes"

    def encode(self, text: str) -> list[int]:
        return shapes.encode(text)

    def decode(self, ids) -> str:
        return shapes.decode(ids)


class FileTokenizer:
    """A ``tokenizers`` tokenizer read from ``tokenizer.json`` (no special tokens added: the model's
    prompt format adds its own ``<bos>`` / ``<eos>``)."""

    def __init__(self, path):
        from tokenizers import Tokenizer

        self.path = str(path)
        self.name = self.path
        self._tok = Tokenizer.from_file(self.path)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def tokenizer_for(model_dir=None):
    """The tokenizer of a model directory: its ``tokenizer.json`` if it has one, else the shapes vocabulary."""
    if model_dir is not None and (Path(model_dir) / TOKENIZER_FILE).is_file():
        return FileTokenizer(Path(model_dir) / TOKENIZER_FILE)
    return ShapesTokenizer()


def tokenizer_files(model_dir) -> list[Path]:
    """The tokenizer files a model directory holds (copied into every model derived from it). Where
    the directory has a ``SHA256SUMS``, only the files it lists: a derived model's manifest would
    otherwise turn an unverified file into a verified one."""
    import logging

    from .io import MANIFEST, manifest_entries

    model_dir = Path(model_dir)
    present = [model_dir / n for n in TOKENIZER_FILES if (model_dir / n).is_file()]
    if not (model_dir / MANIFEST).is_file():
        return present
    listed = manifest_entries(model_dir)
    for path in present:
        if path.name not in listed:
            logging.getLogger(__name__).warning(
                "%s is not in %s's %s: not carried into the derived model", path.name, model_dir, MANIFEST
            )
    return [p for p in present if p.name in listed]
