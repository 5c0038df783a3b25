"""Readers of the tuning data's raw sources, each yielding ``Record`` s in a fixed order.

* ``webdataset``: ``.tar`` files whose members are grouped by key (the name before its first dot after
  the last slash, WebDataset's rule): one image member (``image_key``, e.g. ``jpg``) and one caption
  member (``caption_key``: ``txt``, or ``json`` with the caption under ``caption_field``);
* ``bagel_parquet``: BAGEL's T2I layout, a directory of ``.parquet`` files whose rows hold ``image``
  (encoded bytes) and ``captions`` (a JSON object of captions; one is drawn per row from the seed);
* ``teacher``: captions only (a ``.txt`` file, one per line, or ``.jsonl`` with ``caption_field``):
  the dense model samples the images.

Nothing here decodes an image; a member that cannot be paired is counted, not guessed at.
"""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

SUFFIXES = {"webdataset": (".tar",), "bagel_parquet": (".parquet",), "teacher": (".txt", ".jsonl")}


@dataclass(frozen=True)
class Record:
    """One training example before encoding: a stable key, its caption and its encoded image (None
    for ``teacher`` captions)."""

    key: str
    caption: str
    image: bytes | None = None


class SourceError(ValueError):
    """A raw source that cannot be read as its configured format."""


def source_files(root, source: str) -> list[Path]:
    """The files of ``source`` under ``root`` (a file, or a directory searched recursively), sorted."""
    root = Path(root)
    suffixes = SUFFIXES[source]
    if root.is_file():
        files = [root] if root.suffix in suffixes else []
    else:
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in suffixes)
    if not files:
        raise SourceError(f"{root}: no {'/'.join(suffixes)} files for tuning data source {source!r}")
    return files


def caption_of(data: bytes, key: str, field: str, where: str) -> str:
    """The caption in a member: plain text, or the ``field`` of a JSON object."""
    text = data.decode("utf-8", errors="strict").strip()
    if key == "json":
        try:
            obj = json.loads(text)
        except ValueError as e:
            raise SourceError(f"{where}: not JSON ({e})") from None
        value = obj.get(field) if isinstance(obj, dict) else None
        if not isinstance(value, str):
            raise SourceError(f"{where}: no string {field!r} in its JSON (keys: {sorted(obj)[:8]})")
        return value.strip()
    return text


def webdataset_records(
    files, image_key: str, caption_key: str, caption_field: str, skipped: Counter
) -> Iterator[Record]:
    """Pairs of image and caption members, tar by tar, in the order their keys first appear."""
    for path in files:
        groups: dict[str, dict[str, bytes]] = {}
        with tarfile.open(path, "r") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, _, base = member.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                if not dot:
                    continue
                key = f"{folder}/{stem}" if folder else stem
                if ext in (image_key, caption_key):
                    groups.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for key, parts in groups.items():
            if image_key not in parts or caption_key not in parts:
                skipped["incomplete"] += 1
                continue
            where = f"{path.name}:{key}.{caption_key}"
            yield Record(
                f"{path.name}:{key}",
                caption_of(parts[caption_key], caption_key, caption_field, where),
                parts[image_key],
            )


def bagel_parquet_records(files, seed: int, skipped: Counter) -> Iterator[Record]:
    """Rows of BAGEL's T2I parquet; the caption is one value of the row's ``captions`` object, drawn
    from ``seed``, the file's index and the row (BAGEL draws one per sample as well)."""
    import pyarrow.parquet as pq

    for f_index, path in enumerate(files):
        table = pq.ParquetFile(path)
        missing = {"image", "captions"} - set(table.schema_arrow.names)
        if missing:
            raise SourceError(f"{path}: a BAGEL T2I parquet has columns image and captions; {sorted(missing)} missing")
        row = 0
        for batch in table.iter_batches(columns=["image", "captions"], batch_size=256):
            for image, captions in zip(batch.column("image").to_pylist(), batch.column("captions").to_pylist()):
                where = f"{path.name}:{row}"
                row += 1
                if isinstance(image, dict):  # a datasets-style image struct {bytes, path}
                    image = image.get("bytes")
                try:
                    values = [v for v in json.loads(captions).values() if isinstance(v, str) and v.strip()]
                except (TypeError, ValueError, AttributeError):
                    raise SourceError(f"{where}: captions is not a JSON object of strings") from None
                if not image or not values:
                    skipped["incomplete"] += 1
                    continue
                pick = np.random.default_rng([seed, f_index, row - 1]).integers(len(values))
                yield Record(where, values[int(pick)].strip(), bytes(image))


def caption_records(files, caption_field: str, skipped: Counter) -> Iterator[Record]:
    """Captions only (``teacher``): lines of ``.txt`` files or objects of ``.jsonl`` files."""
    for path in files:
        for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path.name}:{line_no}"
            text = caption_of(line.encode(), "json" if path.suffix == ".jsonl" else "txt", caption_field, where)
            if not text:
                skipped["incomplete"] += 1
                continue
            yield Record(where, text)


def read_records(root, settings: dict, skipped: Counter) -> Iterator[Record]:
    """The records of the configured source (``settings``: ``prepare.PREPARE_DEFAULTS``'s keys)."""
    source = settings["source"]
    files = source_files(root, source)
    if source == "webdataset":
        return webdataset_records(
            files, settings["image_key"], settings["caption_key"], settings["caption_field"], skipped
        )
    if source == "bagel_parquet":
        return bagel_parquet_records(files, settings["seed"], skipped)
    if source == "teacher":
        return caption_records(files, settings["caption_field"], skipped)
    raise SourceError(f"tuning data source {source!r} has no files to read (shapes is drawn while tuning)")
