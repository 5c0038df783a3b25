"""The rehearsals' world: fake repositories, in the real layouts and under the real names, of every
outside input a real study reads (the checkpoint, GenEval's detector and CLIP, MME, POPE, the tuning
data), served by the local Hub, and the locks a rehearsal config names (data/rehearsal/), written in
the shipped locks' shape: a commit and the file list, every size and digest left for the fetch to
complete from the Hub's tree."""

from __future__ import annotations

import json
from pathlib import Path

from helpers.benchmarks import POPE_COLUMNS, mme_files, mme_rows, parquet_bytes, pope_rows, tiny_clip, tiny_detector
from helpers.local_hub import LocalHub
from helpers.tune_data import CAPTIONS, write_tar

#: lock file name (data/rehearsal/) -> (repository kind, repository id)
LOCKS = {
    "bagel-7b-mot.lock.json": ("model", "ByteDance-Seed/BAGEL-7B-MoT"),
    "qwen-image.lock.json": ("model", "Qwen/Qwen-Image"),
    "mask2former-swin-small-coco-instance.lock.json": ("model", "facebook/mask2former-swin-small-coco-instance"),
    "clip-vit-large-patch14.lock.json": ("model", "openai/clip-vit-large-patch14"),
    "mme.lock.json": ("dataset", "lmms-lab/MME"),
    "pope.lock.json": ("dataset", "lmms-lab/POPE"),
    "text-to-image-2m.lock.json": ("dataset", "jackyhate/text-to-image-2M"),
}
#: files a lock lists by pattern, as the shipped MME and POPE locks do
PATTERNS = {"mme.lock.json": ["data/test-*.parquet"], "pope.lock.json": ["data/test-*.parquet"]}


def files_of(directory: Path) -> dict:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def evaluation_repositories(root: Path) -> dict:
    """{(kind, repo id): {path: bytes}} of the inputs every study reads besides its checkpoint: the
    GenEval detector and CLIP, MME, POPE and the tuning data, at toy sizes."""
    tiny_detector(root / "detector", "cat")
    tiny_clip(root / "clip")
    pope = parquet_bytes(pope_rows(), POPE_COLUMNS)
    write_tar(root / "t2i" / "data_000000.tar", CAPTIONS[:6], size=(48, 40))
    return {
        LOCKS["mask2former-swin-small-coco-instance.lock.json"]: files_of(root / "detector"),
        LOCKS["clip-vit-large-patch14.lock.json"]: files_of(root / "clip"),
        LOCKS["mme.lock.json"]: mme_files(mme_rows()),
        LOCKS["pope.lock.json"]: {"data/test-00000-of-00001.parquet": pope, "README.md": b"# POPE\n"},
        LOCKS["text-to-image-2m.lock.json"]: {
            "data_1024_10K/data_000000.tar": (root / "t2i/data_000000.tar").read_bytes()
        },
    }


def bagel_repositories(root: Path) -> dict:
    """The paper study's inputs: a BAGEL-7B-MoT checkpoint in BAGEL's layout at toy sizes, and the rest."""
    from unisparse.models.bagel import write_fake_checkpoint

    write_fake_checkpoint(root / "bagel", sizes={"image_size": 32})
    return {LOCKS["bagel-7b-mot.lock.json"]: files_of(root / "bagel"), **evaluation_repositories(root)}


def qwen_image_repositories(root: Path) -> dict:
    """The Qwen-Image study's inputs: a tiny pipeline in the diffusers layout, and the rest."""
    from helpers.qwen_image import write_tiny_pipeline

    write_tiny_pipeline(root / "qwen-image")
    return {LOCKS["qwen-image.lock.json"]: files_of(root / "qwen-image"), **evaluation_repositories(root)}


def serve(hub: LocalHub, repositories: dict) -> dict:
    """Add every repository to ``hub``; {(kind, repo id): its commit}."""
    return {
        (kind, repo_id): hub.add(repo_id, files, repo_type=kind).commit
        for (kind, repo_id), files in repositories.items()
    }


def write_locks(workdir: Path, repositories: dict, commits: dict) -> Path:
    """data/rehearsal/<lock> in ``workdir`` for each repository: its commit and its files (by pattern
    where the shipped lock lists them so), no size or digest (the fetch completes them)."""
    out = workdir / "data" / "rehearsal"
    out.mkdir(parents=True, exist_ok=True)
    for name, key in LOCKS.items():
        if key not in repositories:
            continue
        kind, repo_id = key
        patterns = PATTERNS.get(name, [])
        listed = [] if patterns else sorted(repositories[key])
        lock = {
            "repo_id": repo_id,
            "repo_type": kind,
            "revision": commits[key],
            "files": {n: {"size": None, "sha256": None} for n in listed},
            **({"patterns": patterns} if patterns else {}),
        }
        (out / name).write_text(json.dumps(lock, indent=2))
    return out
