"""Deterministic randomness of the shapes world: the split names, and seeds and hash splits made with
``hashlib`` (Python's ``hash`` is salted per process), so every draw is the same on every machine."""

from __future__ import annotations

import hashlib

SPLITS = ("train", "calib", "eval")


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def stable_unit(text: str) -> float:
    """Map text to [0, 1) with sha256: stable across processes and machines."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def derive_seed(*parts: object) -> int:
    """Derive a 32-bit seed from arbitrary parts, stably (sha256 of reprs)."""
    text = "|".join(str(p) for p in parts)
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big")
