"""MME (Fu et al., 2023), the understanding benchmark the paper reports, scored as MME's own evaluation
scores it, and a disjoint set of MME-style yes/no items for calibrating the understanding tower.

The rules, from MME's official ``calculation.py`` (as shipped in BAGEL, ``eval/vlm/eval/mme/``) and
BAGEL's ``eval/vlm/eval/mme/eval.py``:

* 14 subtasks, every image asked exactly two yes/no questions (in the release, one "yes" and one "no").
  Perception = existence, count, position, color, posters, celebrity, scene, landmark, artwork, OCR;
  Cognition = commonsense_reasoning, numerical_calculation, text_translation, code_reasoning.
* Prompt (BAGEL): the dataset's question (which already ends in "Please answer yes or no."), one space,
  then "Answer the question using a single word or phrase." No system prompt, no chat roles: BAGEL's
  ``chat`` puts the image (``<|vision_start|>`` ViT tokens ``<|vision_end|>``), then
  ``<|im_start|> prompt <|im_end|>``, and decodes greedily after a new ``<|im_start|>`` (max 20 tokens).
  ``MoTForUnifiedModel.understanding_inputs`` (``prompt_format="bagel"``) builds that layout around the
  prompt's token ids.
* Post-processing (BAGEL): drop newlines, map the Chinese 是 / 不是 / 否 to Yes / No, lower-case,
  ``true`` -> ``yes``, ``false`` -> ``no``, drop remaining CJK characters.
* Parsing (official): lower-case; exactly ``yes`` or ``no`` is that answer; otherwise look at the first
  four characters only: ``yes`` in them -> yes, else ``no`` in them -> no, else "other", which counts as
  wrong. So "Yes." and "Yes, it is" -> yes, "nope" and "not sure" -> no (the prefix rule is blunt, and
  it is the rule), "maybe" and "" -> other. (The official script reads its answers back from a
  tab-separated file with the line's newline still attached, so it never hits the exact-match branch,
  but the prefix rule gives the same label for every string; a response containing a tab breaks its
  line split and the question is silently dropped from ``acc``: here such a response is simply parsed,
  and anything but yes/no is wrong.)
* Per subtask: ``acc`` = correct questions / questions; ``acc_plus`` = images with both questions right /
  images; score = 100 * (acc + acc_plus), at most 200. Perception = sum of its 10 subtask scores (at
  most 2000), cognition = sum of its 4 (at most 800); BAGEL reports their sum (2388 for BAGEL-7B-MoT),
  here ``total``.

Standard errors (``se``), treating images as the independent units the benchmark samples:
  * ``acc``: binomial, ``sqrt(p (1 - p) / n)`` over the n questions (as ShapesQA reports; it ignores
    that the two questions of an image are correlated, so it is a little optimistic);
  * ``acc_plus``: binomial over the m images;
  * subtask ``score``: exact per-image decomposition. With ``k_i`` the number of correct answers on
    image i, ``score = mean_i z_i`` with ``z_i = 100 * (k_i / 2 + [k_i == 2])`` (0, 50 or 200), so its
    standard error is ``std(z) / sqrt(m)`` (population std, like the binomial ones), which accounts for
    the correlation between acc and acc+ and between an image's two questions;
  * perception / cognition / total: subtasks use disjoint images, so their variances add.

Answering: the model is asked for the next token after the prompt (``understanding_logits``), greedily
(argmax), and that one token, decoded with the model's tokenizer, is the response. BAGEL generates up to
20 tokens, but the parse looks at four characters and, for these prompts, the first token decides:
Qwen2's vocabulary has "Yes" and "No" as single tokens. A model that starts its answer with something
else ("The answer is yes") is "other" both here and in the official pipeline.

Images: BAGEL's ViT takes each image at its own resolution (NaViT packing): the long side scaled to at
most 980 px (the short side to at least 378), both sides rounded to multiples of 14, bicubic. The default
``transform`` (``bagel_transform``) reads the model's ``families.ImageGeometry`` and does exactly
that for a model whose vision tower is SigLIP-NaViT (``resize`` ``navit``, BAGEL's): ``navit_resize``,
with the long side capped at ``image_size`` (BAGEL: 980, where the cap changes nothing) and by the
position table (``max_patches_per_side`` patches). A model with a fixed-size encoder (the tiny default,
Qwen-Image's letterboxed square) takes square ``image_size`` images: ``letterbox`` applies BAGEL's
resize rule, shrinks the result further only if it does not fit, and pads it centred (on the patch
grid) on a mid-grey canvas (0.5, which SigLIP's normalisation maps to 0), never distorting the aspect
ratio. ``run_mme`` takes any ``transform(image, geometry)``.

Data: both datasets are read from the local Hugging Face cache only (never downloaded here), as the
parquet shards of the Hub's datasets (``data/<split>-*.parquet``); see ``data/mme/SOURCE.md`` for their
layouts, commits and the download command.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np
import torch
from tqdm import tqdm

from ..families.base import ImageGeometry
from ..spec import merge_spec

log = logging.getLogger(__name__)

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
#: MME's two categories, their subtasks in MME's order (names exactly as MME's ``eval_type_dict``)
CATEGORIES = {"perception": PERCEPTION, "cognition": COGNITION}
SUBTASKS = PERCEPTION + COGNITION
CATEGORY_OF = {name: cat for cat, names in CATEGORIES.items() for name in names}
#: questions per image, and the full benchmark's size (lmms-lab/MME's test split; MME's release)
QUESTIONS_PER_IMAGE = 2
MME_ITEMS = 2374
#: what BAGEL's MME evaluation appends to each question (eval/vlm/eval/mme/eval.py)
BAGEL_SUFFIX = "Answer the question using a single word or phrase."
#: MME's questions end with this; POPE's do not (``calibration_items`` adds it)
YES_NO_SUFFIX = "Please answer yes or no."
LABELS = ("yes", "no", "other")

MME_COLUMNS = ("question_id", "question", "answer", "category")
#: the COCO-image subtasks of MME (their question_id is the COCO file name)
COCO_SUBTASKS = ("existence", "count", "position", "color")

#: the settings ``run_mme`` reads (other keys of the evaluation settings are ignored)
MME_DEFAULTS = dict(
    mme_dataset="lmms-lab/MME",
    mme_revision=None,  # a commit (or branch) in the cache; None = the cache's refs/main
    mme_split="test",
    mme_max_images_per_subtask=None,  # None = all; else the first k images of a fixed hash order
    batch_size=16,
    hf_cache_dir=None,  # None = huggingface_hub's cache (HF_HUB_CACHE / HF_HOME)
)
#: the settings ``calibration_items`` reads
MME_CALIB_DEFAULTS = dict(
    calib_dataset="lmms-lab/POPE",
    calib_revision=None,
    calib_split="test",
    calib_items=84,  # the published MME calibration streams 6 lines x 14 subtasks = 84 items
    calib_exclude_mme_images=True,  # drop POPE items on COCO images that MME's evaluation also uses
    mme_dataset=MME_DEFAULTS["mme_dataset"],
    mme_revision=None,
    mme_split="test",
    hf_cache_dir=None,
)


# ------------------------------------------------------------------------------------------ answers
_CJK = re.compile(r"[\u4e00-\u9fa5]")


def bagel_postprocess(response: str) -> str:
    """BAGEL's ``post_processing`` of a generated answer (eval/vlm/eval/mme/eval.py)."""
    r = response.replace("\n", "").replace("不是", "No").replace("是", "Yes").replace("否", "No")
    r = r.lower().replace("true", "yes").replace("false", "no")
    return _CJK.sub("", r)


def parse_answer(text: str) -> str:
    """MME's official label of an answer: "yes", "no" or "other" (``parse_pred_ans``: exact match, else
    the first four characters, "yes" checked before "no")."""
    t = text.lower()
    if t in ("yes", "no"):
        return t
    head = t[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def answer_label(response: str) -> str:
    """A raw model response -> "yes" / "no" / "other", as BAGEL's evaluation scores it."""
    return parse_answer(bagel_postprocess(response))


def mme_prompt(question: str) -> str:
    """The text BAGEL's MME evaluation gives the model for a question."""
    return f"{question.strip()} {BAGEL_SUFFIX}"


def _gt(answer) -> str:
    a = str(answer).strip().lower()
    if a not in ("yes", "no"):
        raise ValueError(f"MME ground truth must be yes or no, got {answer!r}")
    return a


# ------------------------------------------------------------------------------------------ scoring
def _se(values) -> float:
    """Standard error of a mean over independent units (population std / sqrt(n), so a proportion's is
    the binomial ``sqrt(p (1 - p) / n)``)."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.std() / np.sqrt(len(v)))


def mme_scores(records: Iterable[Mapping]) -> dict:
    """MME's scores from per-question records with keys ``category`` (the subtask), ``question_id``
    (the image), ``answer`` (ground truth yes/no) and ``pred`` ("yes" / "no" / "other").

    Returns ``total``, ``perception``, ``cognition``, ``per_subtask`` {name: acc, acc_plus, score, n
    (questions), n_images, n_other}, ``se`` (see the module docstring), ``n_items`` and
    ``missing_subtasks`` (the category sums are MME's only when that list is empty)."""
    by_image: dict[str, dict[str, list[bool]]] = {}
    other: dict[str, int] = {}
    for r in records:
        name = r["category"]
        if name not in CATEGORY_OF:
            raise ValueError(f"unknown MME subtask {name!r}; expected one of {list(SUBTASKS)}")
        pred = r["pred"]
        if pred not in LABELS:
            raise ValueError(f"prediction must be one of {LABELS}, got {pred!r} (parse it with answer_label)")
        by_image.setdefault(name, {}).setdefault(str(r["question_id"]), []).append(pred == _gt(r["answer"]))
        other[name] = other.get(name, 0) + (pred == "other")
    if not by_image:
        raise ValueError("no MME results")
    per, se_per = {}, {}
    for name in SUBTASKS:
        images = by_image.get(name)
        if not images:
            continue
        bad = {q: len(c) for q, c in images.items() if len(c) != QUESTIONS_PER_IMAGE}
        if bad:
            raise ValueError(
                f"MME subtask {name}: every image has {QUESTIONS_PER_IMAGE} questions; "
                f"these have {dict(list(bad.items())[:5])}"
            )
        correct = np.array(list(images.values()), dtype=np.float64)  # [images, 2]
        k = correct.sum(1)
        both = (k == QUESTIONS_PER_IMAGE).astype(np.float64)
        acc, acc_plus = float(correct.mean()), float(both.mean())
        per[name] = {
            "category": CATEGORY_OF[name],
            "acc": acc,
            "acc_plus": acc_plus,
            "score": 100.0 * (acc + acc_plus),
            "n": int(correct.size),
            "n_images": len(images),
            "n_other": other[name],
        }
        z = 100.0 * (k / QUESTIONS_PER_IMAGE + both)
        se_per[name] = {"acc": _se(correct.ravel()), "acc_plus": _se(both), "score": _se(z)}
    out: dict = {}
    se: dict = {}
    for cat, names in CATEGORIES.items():
        present = [n for n in names if n in per]
        out[cat] = float(sum(per[n]["score"] for n in present))
        se[cat] = float(np.sqrt(sum(se_per[n]["score"] ** 2 for n in present)))
    out["total"] = out["perception"] + out["cognition"]
    se["total"] = float(np.hypot(se["perception"], se["cognition"]))
    se["per_subtask"] = se_per
    missing = [n for n in SUBTASKS if n not in per]
    if missing:
        log.warning("MME: subtasks missing from the results (category sums are partial): %s", missing)
    return {
        "total": out["total"],
        "perception": out["perception"],
        "cognition": out["cognition"],
        "per_subtask": per,
        "se": se,
        "n_items": sum(p["n"] for p in per.values()),
        "missing_subtasks": missing,
    }


# ------------------------------------------------------------------------------------------ images
BAGEL_MAX_IMAGE_SIZE, BAGEL_MIN_IMAGE_SIZE, BAGEL_MAX_PIXELS = 980, 378, 2_007_040  # data/configs/example.yaml
PAD_VALUE = 0.5


def bagel_resize_shape(
    width: int,
    height: int,
    stride: int = 14,
    max_size: int = BAGEL_MAX_IMAGE_SIZE,
    min_size: int = BAGEL_MIN_IMAGE_SIZE,
    max_pixels: int = BAGEL_MAX_PIXELS,
) -> tuple[int, int]:
    """(width, height) BAGEL's ``MaxLongEdgeMinShortEdgeResize`` gives an image for understanding (its
    ``vlm_sft`` settings by default: long side <= 980, short side >= 378 where the long side allows,
    <= 2,007,040 pixels, multiples of 14)."""

    def apply(w, h, s):
        return (
            max(stride, int(round(round(w * s) / stride) * stride)),
            max(stride, int(round(round(h * s) / stride) * stride)),
        )

    scale = min(max_size / max(width, height), 1.0)
    scale = max(scale, min_size / min(width, height))
    w, h = apply(width, height, scale)
    if w * h > max_pixels:
        w, h = apply(w, h, max_pixels / (w * h))
    if max(w, h) > max_size:
        w, h = apply(w, h, max_size / max(w, h))
    return w, h


def navit_resize(image, geometry) -> np.ndarray:
    """A PIL image -> [h, w, 3] float32 in [0, 1] at BAGEL's resolution for it (``bagel_resize_shape``,
    bicubic), the long side capped at the geometry's ``image_size`` and at the ViT's position table
    (``max_patches_per_side`` x ``patch_size``); both sides multiples of the patch. ``geometry``:
    anything ``ImageGeometry.of`` reads."""
    from PIL import Image

    g = ImageGeometry.of(geometry)
    patch = g.patch_size
    cap = min(BAGEL_MAX_IMAGE_SIZE, g.image_size, g.max_patches_per_side * patch)
    cap = max(patch, cap // patch * patch)
    image = image.convert("RGB")
    w, h = bagel_resize_shape(*image.size, stride=patch, max_size=cap, min_size=min(BAGEL_MIN_IMAGE_SIZE, cap))
    return np.asarray(image.resize((w, h), Image.BICUBIC), dtype=np.float32) / 255.0


def letterbox(image, geometry) -> np.ndarray:
    """A PIL image -> [S, S, 3] float32 in [0, 1], S = the geometry's ``image_size``: BAGEL's resize
    (``bagel_resize_shape``, bicubic), shrunk to fit S if needed (aspect kept), centred on a
    ``PAD_VALUE`` grey canvas at an offset on the ``patch_size`` grid."""
    from PIL import Image

    g = ImageGeometry.of(geometry)
    size, patch = g.image_size, g.patch_size
    image = image.convert("RGB")
    w, h = bagel_resize_shape(*image.size, stride=patch)
    if max(w, h) > size:
        s = size / max(w, h)
        w, h = max(1, min(size, round(w * s))), max(1, min(size, round(h * s)))
    arr = np.asarray(image.resize((w, h), Image.BICUBIC), dtype=np.float32) / 255.0
    canvas = np.full((size, size, 3), PAD_VALUE, dtype=np.float32)
    y0, x0 = (size - h) // 2 // patch * patch, (size - w) // 2 // patch * patch
    canvas[y0 : y0 + h, x0 : x0 + w] = arr
    return canvas


def bagel_transform(image, geometry) -> np.ndarray:
    """The default image transform: ``navit_resize`` for a SigLIP-NaViT vision tower (images of their own
    sizes, as BAGEL), else ``letterbox`` (a fixed-size encoder takes one square size)."""
    g = ImageGeometry.of(geometry)
    if g.resize == "navit":
        return navit_resize(image, g)
    return letterbox(image, g)


def prepare_batch(images, prompts, tokenizer, geometry, transform: Callable | None = None):
    """PIL images and prompt texts -> (images, prompt token ids), the inputs of ``understanding_logits``
    (which adds BAGEL's special tokens around the ids). ``geometry``: the family's ``image_geometry``
    (or anything ``ImageGeometry.of`` reads), handed to ``transform``. Images: [B, H, W, 3] float32 in
    [0, 1] when the transform gives them one size, else a list of [H_i, W_i, 3] (NaViT)."""
    transform = transform or bagel_transform
    geometry = ImageGeometry.of(geometry)
    arrays = [transform(im, geometry) for im in images]
    if len({a.shape for a in arrays}) == 1:
        pixels = torch.from_numpy(np.stack(arrays))
    else:
        pixels = [torch.from_numpy(a) for a in arrays]
    return pixels, [list(tokenizer.encode(p)) for p in prompts]


def _check_tokenizer(tokenizer) -> None:
    if getattr(tokenizer, "name", None) == "shapes":
        raise ValueError(
            "MME needs a model with a text tokenizer (tokenizer.json, e.g. an imported BAGEL "
            "checkpoint); the shapes world's word vocabulary cannot encode MME's questions"
        )


# ------------------------------------------------------------------------------------------ data
@dataclass(frozen=True)
class MMEItem:
    """One MME question. ``question_id`` names the image (its two questions share it, within a subtask)."""

    category: str
    question_id: str
    question: str
    answer: str  # "yes" / "no"
    image_bytes: bytes = field(repr=False)

    @property
    def image_key(self) -> tuple[str, str]:
        return self.category, self.question_id

    def image(self):
        """The image as PIL decodes it (converted to RGB where it is used, as BAGEL's eval does)."""
        return _open_image(self.image_bytes)


def _open_image(data: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(data))


def _hash_key(*parts) -> str:
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()


def _cache_hint(cache_dir) -> str:
    if cache_dir is not None:
        return str(cache_dir)
    from huggingface_hub import constants

    return f"{constants.HF_HUB_CACHE} (HF_HUB_CACHE)"


def dataset_snapshot(repo_id: str, revision: str | None = None, patterns=None, cache_dir=None) -> Path:
    """The local snapshot folder of a Hub dataset, from the Hugging Face cache only (no network): a
    FileNotFoundError naming the repository, the revision and the cache when it is not there."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(
                repo_id,
                repo_type="dataset",
                revision=revision,
                cache_dir=cache_dir,
                allow_patterns=patterns,
                local_files_only=True,
            )
        )
    except LocalEntryNotFoundError as e:
        pin = f" --revision {revision}" if revision else ""
        raise FileNotFoundError(
            f"dataset {repo_id} (revision {revision or 'main'}) is not in the local Hugging Face cache "
            f"{_cache_hint(cache_dir)}; unisparse never downloads benchmark data. Fetch it once with "
            f"`hf download {repo_id} --repo-type dataset{pin}` (see data/mme/SOURCE.md), or point "
            f"HF_HUB_CACHE / hf_cache_dir at a cache that has it ({e.__class__.__name__}: {e})"
        ) from None


_SHARD = re.compile(r"(?P<split>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})(?:-[0-9a-f]+)?\.parquet")


def parquet_files(root: Path, split: str, subdir: str = "data") -> list[Path]:
    """The parquet shards of ``split`` in a snapshot (``<subdir>/<split>-0000i-of-0000n[-hash].parquet``,
    the layout ``datasets`` pushes), checked complete: every index 0..n-1 exactly once."""
    folder = Path(root) / subdir
    files = sorted(p for p in folder.glob(f"{split}-*.parquet") if p.is_file())
    if not files:
        raise FileNotFoundError(f"no {subdir}/{split}-*.parquet in the cached snapshot {root}")
    shards: dict[int, list[int]] = {}
    for p in files:
        m = _SHARD.fullmatch(p.name)
        if m and m["split"] == split:
            shards.setdefault(int(m["n"]), []).append(int(m["i"]))
    for n, idx in shards.items():
        if sorted(idx) != list(range(n)):
            raise ValueError(
                f"{folder}: the {split} shards of {n} are incomplete or duplicated "
                f"(indices {sorted(idx)}); is the snapshot a half-finished download?"
            )
    return files


def _read_columns(path: Path, columns) -> dict[str, list]:
    import pyarrow.parquet as pq

    have = pq.read_schema(path).names
    missing = [c for c in columns if c not in have]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; it has {have}")
    table = pq.read_table(path, columns=list(columns))
    return {c: table.column(c).to_pylist() for c in columns}


def _read_images(path: Path, rows: list[int]) -> list[bytes]:
    import pyarrow.parquet as pq

    column = pq.read_table(path, columns=["image"]).column("image").take(rows).to_pylist()
    out = []
    for row, cell in zip(rows, column):
        data = cell.get("bytes") if isinstance(cell, dict) else cell
        if not data:
            raise ValueError(f"{path} row {row}: image has no embedded bytes ({cell and cell.get('path')!r})")
        out.append(bytes(data))
    return out


def _snapshot_commit(path: Path) -> str:
    return path.name  # the cache keeps each revision under snapshots/<commit>


def _load_mme(
    repo_id="lmms-lab/MME", revision=None, split="test", max_images_per_subtask=None, cache_dir=None
) -> tuple[list[MMEItem], dict]:
    root = dataset_snapshot(repo_id, revision, [f"data/{split}-*.parquet"], cache_dir)
    files = parquet_files(root, split)
    meta = [(f, _read_columns(f, MME_COLUMNS)) for f in files]
    images: dict[tuple[str, str], list[tuple[Path, int]]] = {}
    for f, cols in meta:
        for row, (qid, cat) in enumerate(zip(cols["question_id"], cols["category"])):
            if cat not in CATEGORY_OF:
                raise ValueError(f"{f} row {row}: unknown MME subtask {cat!r}")
            images.setdefault((cat, str(qid)), []).append((f, row))
    bad = {k: len(v) for k, v in images.items() if len(v) != QUESTIONS_PER_IMAGE}
    if bad:
        raise ValueError(
            f"{repo_id}: every MME image has {QUESTIONS_PER_IMAGE} questions; "
            f"{len(bad)} do not, e.g. {dict(list(bad.items())[:3])}"
        )
    keep = sorted(images)
    if max_images_per_subtask is not None:
        k = int(max_images_per_subtask)
        if k < 1:
            raise ValueError(f"mme_max_images_per_subtask must be >= 1 or None, got {k}")
        by_task: dict[str, list] = {}
        for key in sorted(images, key=lambda key: _hash_key(*key)):  # nested: k images are in k+1's
            by_task.setdefault(key[0], []).append(key)
        keep = sorted(key for keys in by_task.values() for key in keys[:k])
    wanted: dict[Path, list[int]] = {}
    for key in keep:
        for f, row in images[key]:
            wanted.setdefault(f, []).append(row)
    cells: dict[tuple[Path, int], bytes] = {}
    for f, rows in wanted.items():
        rows = sorted(rows)
        cells.update({(f, r): b for r, b in zip(rows, _read_images(f, rows))})
    cols_of = dict(meta)
    order = {name: i for i, name in enumerate(SUBTASKS)}
    items = []
    for key in sorted(keep, key=lambda key: (order[key[0]], key[1])):
        for f, row in images[key]:  # file order, then row order: the dataset's question order
            c = cols_of[f]
            items.append(
                MMEItem(
                    category=key[0],
                    question_id=key[1],
                    question=str(c["question"][row]),
                    answer=_gt(c["answer"][row]),
                    image_bytes=cells[(f, row)],
                )
            )
    n_rows = sum(len(c["question_id"]) for _, c in meta)
    if repo_id == MME_DEFAULTS["mme_dataset"] and n_rows != MME_ITEMS:
        log.warning("%s has %d questions in %s, not MME's %d", repo_id, n_rows, split, MME_ITEMS)
    info = {
        "repo_id": repo_id,
        "revision": revision,
        "commit": _snapshot_commit(root),
        "split": split,
        "files": [str(f.relative_to(root)) for f in files],
        "rows": n_rows,
        "items": len(items),
        "images": len(keep),
        "max_images_per_subtask": max_images_per_subtask,
    }
    return items, info


def load_mme(
    repo_id: str = "lmms-lab/MME",
    revision: str | None = None,
    split: str = "test",
    max_images_per_subtask: int | None = None,
    cache_dir=None,
) -> list[MMEItem]:
    """MME's questions from the local Hugging Face cache (``snapshot_download(local_files_only=True)``),
    ordered by subtask (MME's order), image (``question_id``), then the dataset's question order, so an
    image's two questions are adjacent; images are kept as their encoded bytes (decoded when used).
    ``max_images_per_subtask``: keep only the first k images of each subtask in a fixed hash order of
    (subtask, question_id) (deterministic, and the k images are among the k+1), both questions each."""
    return _load_mme(repo_id, revision, split, max_images_per_subtask, cache_dir)[0]


# ------------------------------------------------------------------------------------------ runner
def _settings(defaults: dict, spec: dict | None, what: str, kind: str) -> dict:
    """The keys of ``defaults`` from a larger settings section (others are ignored), checked like the
    section they come from (``kind``: its types and ``unisparse.ranges``)."""
    spec = spec or {}
    return merge_spec(defaults, {k: v for k, v in spec.items() if k in defaults}, what, kind)


@torch.no_grad()
def answer_mme(
    family,
    tokenizer,
    items: list[MMEItem],
    batch_size: int = 16,
    progress: bool = False,
    transform: Callable | None = None,
) -> list[dict]:
    """Per-question records (``category``, ``question_id``, ``question``, ``answer``, ``token_id``,
    ``response``, ``pred``, ``correct``): the greedy first answer token, decoded and parsed."""
    _check_tokenizer(tokenizer)
    if isinstance(family, torch.nn.Module):  # a bare model (library use): its family's adapter
        from ..families import family_for

        family = family_for(family, tokenizer)
    family.eval()
    geometry = ImageGeometry.of(family)
    out = []
    for i in tqdm(range(0, len(items), batch_size), desc="MME", disable=not progress):
        chunk = items[i : i + batch_size]
        decoded: dict[tuple[str, str], object] = {}  # an image's two questions are usually in one batch
        for it in chunk:
            if it.image_key not in decoded:
                decoded[it.image_key] = it.image()
        images, ids = prepare_batch(
            [decoded[it.image_key] for it in chunk],
            [mme_prompt(it.question) for it in chunk],
            tokenizer,
            geometry,
            transform,
        )
        tokens = family.understanding_logits(images, ids).argmax(-1).tolist()
        for it, tok in zip(chunk, tokens):
            response = tokenizer.decode([tok])
            pred = answer_label(response)
            out.append(
                {
                    "category": it.category,
                    "question_id": it.question_id,
                    "question": it.question,
                    "answer": it.answer,
                    "token_id": int(tok),
                    "response": response,
                    "pred": pred,
                    "correct": pred == it.answer,
                }
            )
    return out


def run_mme(
    model, tokenizer, spec: dict | None = None, progress: bool = False, transform: Callable | None = None
) -> dict:
    """Score ``model`` on MME (settings: ``MME_DEFAULTS``; other keys of ``spec`` are ignored).

    The prompt is BAGEL's (``mme_prompt``), the image goes through ``transform(image, family.image_geometry)``
    (default ``bagel_transform``: BAGEL's own resolution on a NaViT model), and the answer is the
    greedy first token of ``understanding_logits``, decoded with ``tokenizer`` and parsed by MME's rules
    (``answer_label``); BAGEL generates a short answer (up to 20 tokens), but for these prompts its first
    token decides yes/no (module docstring).
    Runs on the model's device in the model's dtype (``understanding_logits`` moves the batch).

    Returns ``mme_scores``' dict (``total``, ``perception``, ``cognition``, ``per_subtask``, ``se``,
    ``n_items``, ``missing_subtasks``) plus ``per_item`` (``answer_mme``'s records), ``data`` (the
    dataset's repository, resolved commit, files, subsample) and ``settings``."""
    s = _settings(MME_DEFAULTS, spec, "MME", "evaluation")
    items, info = _load_mme(
        s["mme_dataset"], s["mme_revision"], s["mme_split"], s["mme_max_images_per_subtask"], s["hf_cache_dir"]
    )
    per_item = answer_mme(model, tokenizer, items, int(s["batch_size"]), progress, transform)
    scores = mme_scores(per_item)
    log.info(
        "MME total %.1f (perception %.1f, cognition %.1f) on %d questions",
        scores["total"],
        scores["perception"],
        scores["cognition"],
        scores["n_items"],
    )
    return {**scores, "per_item": per_item, "data": info, "settings": s}


# ------------------------------------------------------------------------------------------ calibration
POPE_COLUMNS = ("question_id", "question", "image_source")
_COCO_ID = re.compile(r"(\d{6,})")


def _coco_id(name) -> int | None:
    found = _COCO_ID.findall(str(name))
    return int(found[-1]) if found else None


def mme_coco_ids(repo_id="lmms-lab/MME", revision=None, split="test", cache_dir=None) -> set[int]:
    """COCO image ids of MME's COCO subtasks (existence, count, position, color), from their
    ``question_id`` file names; reads only the text columns."""
    root = dataset_snapshot(repo_id, revision, [f"data/{split}-*.parquet"], cache_dir)
    ids = set()
    for f in parquet_files(root, split):
        cols = _read_columns(f, ("question_id", "category"))
        for qid, cat in zip(cols["question_id"], cols["category"]):
            if cat in COCO_SUBTASKS and (n := _coco_id(qid)) is not None:
                ids.add(n)
    return ids


def calibration_prompt(question: str) -> str:
    """A POPE question as an MME-style prompt: "Please answer yes or no." (MME's ending) if it lacks it,
    then BAGEL's suffix (``mme_prompt``)."""
    q = question.strip()
    if not q.lower().endswith(YES_NO_SUFFIX.lower()):
        q = f"{q} {YES_NO_SUFFIX}"
    return mme_prompt(q)


def calibration_set(spec: dict | None = None) -> tuple[list[tuple[object, str]], dict]:
    """``calibration_items`` and its provenance (repository, resolved commit, files, exclusions)."""
    s = _settings(MME_CALIB_DEFAULTS, spec, "calibration", "calibration")
    n = int(s["calib_items"])
    if n < 1:
        raise ValueError(f"calib_items must be >= 1, got {n}")
    repo, split = s["calib_dataset"], s["calib_split"]
    root = dataset_snapshot(repo, s["calib_revision"], [f"data/{split}-*.parquet"], s["hf_cache_dir"])
    files = parquet_files(root, split)
    excluded_ids = set()
    if s["calib_exclude_mme_images"]:
        try:
            excluded_ids = mme_coco_ids(s["mme_dataset"], s["mme_revision"], s["mme_split"], s["hf_cache_dir"])
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"{e}\n(calibration reads MME's COCO image ids to keep its items off MME's "
                "images; set calib_exclude_mme_images: false to calibrate without MME)"
            ) from None
    # every distinct (image, question), images in a fixed hash order, one question per image per round
    rows: dict[tuple[str, str], tuple[Path, int]] = {}
    dropped = set()
    for f in files:
        cols = _read_columns(f, POPE_COLUMNS)
        for row, (src, q) in enumerate(zip(cols["image_source"], cols["question"])):
            if excluded_ids and _coco_id(src) in excluded_ids:
                dropped.add(str(src))
                continue
            rows.setdefault((str(src), str(q).strip()), (f, row))
    if not rows:
        raise ValueError(f"{repo}: no calibration items left in {split}")
    per_image: dict[str, list[str]] = {}
    for src, q in rows:
        per_image.setdefault(src, []).append(q)
    ranked = sorted(
        (
            (rank, _hash_key(src), src, q)
            for src, qs in per_image.items()
            for rank, q in enumerate(sorted(qs, key=lambda q: _hash_key(src, q)))
        )
    )
    chosen = [(src, q) for _, _, src, q in ranked[:n]]
    if len(chosen) < n:
        log.warning("%s: only %d distinct calibration items, %d asked for", repo, len(chosen), n)
    wanted: dict[Path, list[int]] = {}
    for key in chosen:
        f, row = rows[key]
        wanted.setdefault(f, []).append(row)
    cells = {}
    for f, rws in wanted.items():
        rws = sorted(set(rws))
        cells.update({(f, r): b for r, b in zip(rws, _read_images(f, rws))})
    items = [(_open_image(cells[rows[key]]), calibration_prompt(key[1])) for key in chosen]
    info = {
        "repo_id": repo,
        "revision": s["calib_revision"],
        "commit": _snapshot_commit(root),
        "split": split,
        "files": [str(f.relative_to(root)) for f in files],
        "items": len(items),
        "images": len({src for src, _ in chosen}),
        "excluded_mme_images": sorted(dropped),
        "exclude_mme_images": bool(s["calib_exclude_mme_images"]),
    }
    return items, info


def calibration_items(spec: dict | None = None) -> list[tuple[object, str]]:
    """MME-style yes/no (image, prompt) pairs for calibrating the understanding tower, NOT from MME:
    POPE (``lmms-lab/POPE``, Li et al. 2023: "Is there a <object> in the image?" on COCO val2014, yes/no)
    read from the local cache like MME. Settings ``MME_CALIB_DEFAULTS``: ``calib_dataset``,
    ``calib_revision``, ``calib_split``, ``calib_items`` (how many), ``calib_exclude_mme_images`` (drop
    POPE images whose COCO id is one of MME's COCO-subtask images, so no evaluation image is seen while
    calibrating; needs MME in the cache).

    Deterministic subsample: the distinct (image, question) pairs (POPE repeats a question across its
    three negative-sampling settings), images in a fixed hash order, one question per image per round,
    the first ``calib_items``; a larger count extends a smaller one. The image is a lazily decoded PIL
    image, the prompt the full MME-style text (``calibration_prompt``); stream them with
    ``prepare_batch(images, prompts, tokenizer, family.image_geometry)`` into ``understanding_logits``."""
    return calibration_set(spec)[0]
