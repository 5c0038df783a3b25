"""Tiny stand-ins for the real benchmarks' models and data in a Hugging Face cache, offline: random
Mask2Former and CLIP models (GenEval) and small MME and POPE datasets, under the real repositories'
names and in huggingface_hub's cache layout."""

import hashlib
import io
import json
import os
from pathlib import Path

import torch

from unisparse.evaluate import geneval as g

# --- GenEval: the detector and CLIP ------------------------------------------------------------------

DETECTOR_COMMIT = "a" * 40
CLIP_COMMIT = "b" * 40


def cache_repo(cache: Path, repo_id: str, commit: str, saved: Path) -> None:
    """huggingface_hub's cache layout: blobs/<sha256>, snapshots/<commit>/<file> -> ../../blobs/..., refs/main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    for f in sorted(saved.iterdir()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / f.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


def tiny_detector(out: Path, favour: str) -> None:
    """A random Mask2Former with a tiny Swin backbone and GenEval's 80 classes; its class head always
    says ``favour`` (so detections pass the thresholds and the colour path runs)."""
    import transformers as T

    swin = T.SwinConfig(
        image_size=64,
        patch_size=4,
        embed_dim=8,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 1, 1],
        window_size=4,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = T.Mask2FormerConfig(
        backbone_config=swin,
        feature_size=32,
        mask_feature_size=32,
        hidden_dim=32,
        encoder_feedforward_dim=32,
        encoder_layers=1,
        decoder_layers=2,
        num_attention_heads=2,
        dim_feedforward=32,
        num_queries=8,
        id2label=dict(enumerate(g.object_names())),
    )
    torch.manual_seed(0)
    model = T.Mask2FormerForUniversalSegmentation(config).eval()
    with torch.no_grad():
        model.class_predictor.weight.zero_()
        model.class_predictor.bias.fill_(-10.0)
        model.class_predictor.bias[g.object_names().index(favour)] = 10.0
    model.save_pretrained(out)
    T.Mask2FormerImageProcessorPil(size={"shortest_edge": 384}, size_divisor=32).save_pretrained(out)


def tiny_clip(out: Path) -> None:
    """A random CLIP with a byte-level tokenizer in CLIP's format (every byte, with and without the
    end-of-word mark, no merges)."""
    import transformers as T
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    (out / "vocab.json").parent.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n")
    tok = T.CLIPTokenizer(vocab=vocab, merges=[])
    tok.save_pretrained(out)
    text = dict(
        vocab_size=len(vocab),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    vision = dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
    )
    torch.manual_seed(1)
    T.CLIPModel(T.CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).eval().save_pretrained(out)
    T.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)


# --- MME and POPE: datasets -----------------------------------------------------------------------

COMMIT_MME = "d6c9023f017b564f7b3ccccf5348166bce8fdbcd"
COMMIT_POPE = "4db1276663dfa5eb8ad16a52d24c31a09e470896"


def png(size, colour, mode="RGB"):
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(size, colour):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


def parquet_bytes(rows, columns):
    """Rows in the layout `datasets` pushes: string columns, and `image` as struct {bytes, path}."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    arrays = {c: pa.array([r[c] for r in rows], type=image_type if c == "image" else pa.string()) for c in columns}
    buf = io.BytesIO()
    pq.write_table(pa.table(arrays), buf)
    return buf.getvalue()


def write_dataset(cache, repo_id, commit, files: dict):
    """huggingface_hub's cache layout for a dataset: blobs named by sha256, snapshots/<commit>/<path>
    as relative symlinks to them, refs/main holding the commit."""
    repo = cache / ("datasets--" + repo_id.replace("/", "--"))
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return repo


MME_SUBTASKS = ("existence", "OCR", "code_reasoning", "text_translation")  # both categories
COCO_IN_MME = "000000006040"


def mme_rows():
    """Two images per subtask, two questions each (one yes, one no), images of several sizes and modes."""
    rows = []
    shapes_ = [((40, 30), "RGB"), ((20, 50), "RGBA"), ((33, 33), "L"), ((64, 16), "RGB")]
    for t, task in enumerate(MME_SUBTASKS):
        for i in range(2):
            name = f"{COCO_IN_MME}.jpg" if (task, i) == ("existence", 0) else f"{i:04d}.png"
            size, mode = shapes_[(t + i) % len(shapes_)]
            data = jpeg(size, (200, 30 * t, 60 * i)) if name.endswith(".jpg") else png(size, 90 + 40 * i, mode)
            for answer in ("Yes", "No"):
                rows.append(
                    {
                        "question_id": f"{task}/{name}",
                        "image": {"bytes": data, "path": None},
                        "question": f"Is this {task} image number {i} {answer.lower()}? Please answer yes or no.",
                        "answer": answer,
                        "category": task,
                    }
                )
    return rows


MME_COLUMNS = ("question_id", "image", "question", "answer", "category")


def mme_files(rows):
    # the real shards' names: test-0000i-of-0000n-<hash>.parquet under data/
    half = len(rows) // 2
    return {
        "data/test-00000-of-00002-a25dbe3b44c4fda6.parquet": parquet_bytes(rows[:half], MME_COLUMNS),
        "data/test-00001-of-00002-7d22c7f1aba6fca4.parquet": parquet_bytes(rows[half:], MME_COLUMNS),
        "README.md": b"---\nconfigs:\n- config_name: default\n  data_files:\n  - split: test\n"
        b"    path: data/test-*\n---\n",
    }


POPE_COLUMNS = ("id", "question_id", "question", "answer", "image_source", "image", "category")


def pope_rows():
    """POPE's layout: three negative-sampling settings asking overlapping questions about the same images."""
    rows, n = [], 0
    images = {
        f"COCO_val2014_{COCO_IN_MME}": jpeg((48, 32), (10, 200, 10)),  # also one of MME's images
        "COCO_val2014_000000310196": jpeg((32, 48), (200, 10, 10)),
        "COCO_val2014_000000000042": png((40, 40), (10, 10, 200)),
        "COCO_val2014_000000123456": png((50, 20), (90, 90, 10)),
    }
    for category in ("adversarial", "popular", "random"):
        for src, data in images.items():
            for obj, answer in (("dog", "yes"), (f"{category} cat", "no")):
                n += 1
                rows.append(
                    {
                        "id": str(n),
                        "question_id": str(n),
                        "question": f"Is there a {obj} in the image?",
                        "answer": answer,
                        "image_source": src,
                        "image": {"bytes": data, "path": None},
                        "category": category,
                    }
                )
    return rows
