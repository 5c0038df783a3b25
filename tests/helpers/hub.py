"""A fake Hugging Face repository (BAGEL-7B-MoT's file names, small contents) and the cache
huggingface_hub would write for it: the checkpoint download tests run offline on it."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ID = "ByteDance-Seed/BAGEL-7B-MoT"
COMMIT = "0123456789abcdef0123456789abcdef01234567"  # fake: no real revision is needed offline
NAME = "bagel-7b-mot"
UNISPARSE = str(Path(sys.executable).parent / "unisparse")
# small stand-ins under BAGEL's file names; *.safetensors are LFS files on the Hub, the rest plain git
FILES = {
    "llm_config.json": b'{"hidden_size": 8, "num_hidden_layers": 2}\n',
    "vit_config.json": b'{"hidden_size": 4}\n',
    "config.json": b'{"architectures": ["Bagel"]}\n',
    "ema.safetensors": bytes(range(256)) * 64,
    "ae.safetensors": b"\x01\x02\x03" * 1000,
    "tokenizer.json": b'{"model": {"type": "BPE"}}\n',
    "tokenizer_config.json": b'{"tokenizer_class": "Qwen2Tokenizer"}\n',
    "vocab.json": b'{"a": 0, "b": 1}\n',
    "merges.txt": b"#version: 0.2\na b\n",
    "generation_config.json": b'{"do_sample": false}\n',
    "preprocessor_config.json": b'{"image_mean": [0.5, 0.5, 0.5]}\n',
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def write_hf_cache(cache: Path, files=FILES, commit=COMMIT, tree=True) -> Path:
    """The cache huggingface_hub writes (file_download.py, _snapshot_download.py): blobs named by their
    etag (an LFS file's sha256, a plain file's git blob id), snapshots/<commit>/<file> as relative
    symlinks to them, refs/main holding the commit (no newline) and, as huggingface_hub >= 2.x also
    writes, the commit's tree listing trees/<commit>.json."""
    repo = cache / ("models--" + REPO_ID.replace("/", "--"))
    listing = {}
    for name, data in files.items():
        lfs = name.endswith(".safetensors")
        etag = sha256(data) if lfs else git_blob_id(data)
        blob = repo / "blobs" / etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
        listing[name] = {
            "size": len(data),
            "blob_id": git_blob_id(b"lfs pointer " + data) if lfs else etag,
            **({"lfs_sha256": etag, "lfs_size": len(data)} if lfs else {}),
        }
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    if tree:
        (repo / "trees").mkdir(exist_ok=True)
        (repo / "trees" / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": listing}))
    return repo


def blob_of(repo: Path, name: str, commit=COMMIT) -> Path:
    return (repo / "snapshots" / commit / name).resolve()


def write_lock(path: Path, files=FILES, commit=COMMIT) -> Path:
    lock = {
        "repo_id": REPO_ID,
        "revision": commit,
        "files": {n: {"sha256": sha256(d), "size": len(d)} for n, d in files.items()},
    }
    path.write_text(json.dumps(lock, indent=2))
    return path


def leftovers(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.tmp-*"))


def run_verb(*args, cache_root: Path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache_root)}
    return subprocess.run([UNISPARSE, "--no-progress", *args], capture_output=True, text=True, env=env)
