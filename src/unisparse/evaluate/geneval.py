"""GenEval (Ghosh et al., 2023) without mmdet: prompts, image folders, detector, colour classifier, scorer.

Why it exists: the paper scores generation with GenEval, whose official scorer needs mmdet 2.x,
mmcv-full 1.7 and open_clip (an environment that no longer installs next to current PyTorch). This
module re-implements GenEval's rules (``evaluation/evaluate_images.py``, ``summary_scores.py`` of
``djghosh13/geneval``; read, not copied) on transformers' Mask2Former and CLIP. It writes images in
GenEval's folder layout, so the official scorer can score the same folder where mmdet is available.

The rules, each kept exactly (``judge`` and ``filter_detections``):

* a detection counts if its score is strictly above 0.3, or strictly above 0.9 for every class when
  the prompt's tag is ``counting``; at most 16 per class, by descending score; no NMS;
* ``include`` clauses (AND): the class needs at least ``count`` detections; only the ``count``
  highest-scoring ones ("counted") are looked at further. ``color``: every counted object must be
  classified as that colour (CLIP zero-shot over 10 colours, on the object's mask composited over
  #999999 grey and cropped to its box). ``position`` [relation, i]: every counted object must stand
  in that relation to every counted object of include clause i, which must itself have matched;
* ``exclude`` clauses (OR): fail when the class has at least ``count`` detections (counting prompts
  exclude N+1, so they require exactly N);
* each image is correct or not; a tag's score is the mean over its images; the overall score is the
  unweighted mean of the six tags' scores, keyed by tag name (the official summary averages in the
  order tags first appear in its results file, so its fixed column header can mislabel columns).

Where this detector differs from GenEval's mmdet one is documented in ``Detector``.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..choices import GENEVAL_PROMPT_SETS
from ..models.sampling import SAMPLER_DEFAULTS, sampler_settings
from ..runtime import describe, synchronize
from ..worlds.shapes import box_relations, derive_seed, tag_accuracies

log = logging.getLogger(__name__)

#: the committed GenEval files (``data/geneval/SOURCE.md`` says where each comes from)
DATA_DIR = Path(__file__).resolve().parents[3] / "data" / "geneval"
METADATA_FILES = dict(zip(GENEVAL_PROMPT_SETS, ("evaluation_metadata.jsonl", "evaluation_metadata_long.jsonl")))
CALIBRATION_FILE = "calibration_metadata.jsonl"
OBJECT_NAMES_FILE = "object_names.txt"

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
#: GenEval's three colour templates (always "a", even before "orange", as in GenEval)
COLOUR_TEMPLATES = ("a photo of a {c} {obj}", "a photo of a {c}-colored {obj}", "a photo of a {c} object")
RELATIONS = ("left of", "right of", "above", "below")

THRESHOLD = 0.3  # a detection counts if its score is strictly above this ...
COUNTING_THRESHOLD = 0.9  # ... or above this, for every class, when the prompt's tag is "counting"
MAX_OBJECTS = 16  # per class, highest scores first
GREY = "#999999"  # the background the colour classifier sees behind an object's mask

DEFAULT_DETECTOR = "facebook/mask2former-swin-small-coco-instance"
DEFAULT_CLIP = "openai/clip-vit-large-patch14"

#: the settings ``run_geneval`` reads (the evaluation settings carry them; sampler keys included)
GENEVAL_DEFAULTS = dict(
    geneval_prompts="long",  # the paper's scripts (and BAGEL's run_geneval.sh) generate from the long prompts
    detector=DEFAULT_DETECTOR,
    detector_revision=None,  # a commit (or branch) in the cache; None = the cache's refs/main
    clip=DEFAULT_CLIP,
    clip_revision=None,
    samples_per_prompt=4,
    max_prompts_per_tag=None,  # None: all 553 prompts
    gen_seed=0,
    batch_size=8,
    **SAMPLER_DEFAULTS,
)
#: an image's seed is ``gen_seed + SEED_STRIDE * index + k`` (index: the metadata line, k: the sample),
#: so it depends on neither the subset, the batch, nor the prompt variant (short and long share noise)
SEED_STRIDE = 1000
CALIBRATION_SEED = 20240601
CALIBRATION_PER_TAG = 16


# ------------------------------------------------------------------------------------------- the files
def object_names() -> list[str]:
    """GenEval's 80 COCO class names, in COCO's contiguous order (the detector's label order)."""
    return (DATA_DIR / OBJECT_NAMES_FILE).read_text().splitlines()


def read_metadata(path) -> list[dict]:
    """The entries of a GenEval metadata file (one JSON object per line), in file order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def load_metadata(variant: str = "short") -> list[dict]:
    """The 553 GenEval entries with the short (original) or long (LLM-rewritten) prompts."""
    if variant not in METADATA_FILES:
        raise ValueError(f"geneval_prompts: unknown variant {variant!r}; expected one of {sorted(METADATA_FILES)}")
    return read_metadata(DATA_DIR / METADATA_FILES[variant])


def select_prompts(entries: Sequence[dict], max_prompts_per_tag: int | None = None) -> list[tuple[int, dict]]:
    """(index, entry) pairs to evaluate: all, or a seeded subset of at most ``max_prompts_per_tag`` per
    tag. The subset depends only on the tag's list of indices, so the short and long variants (and
    every ``gen_seed``) evaluate the same prompts."""
    indexed = list(enumerate(entries))
    if max_prompts_per_tag is None:
        return indexed
    keep = set()
    for tag in sorted({e["tag"] for e in entries}):
        idx = [i for i, e in indexed if e["tag"] == tag]
        if len(idx) > max_prompts_per_tag:
            rng = np.random.default_rng(derive_seed("geneval-subset", tag))
            idx = [idx[j] for j in rng.choice(len(idx), size=max_prompts_per_tag, replace=False)]
        keep.update(idx)
    return [(i, e) for i, e in indexed if i in keep]


def sample_seed(gen_seed: int, index: int, k: int) -> int:
    """The seed of sample ``k`` of metadata line ``index`` (see ``SEED_STRIDE``)."""
    if not 0 <= k < SEED_STRIDE:
        raise ValueError(f"samples_per_prompt must be below {SEED_STRIDE}")
    return int(gen_seed) + SEED_STRIDE * int(index) + int(k)


# ------------------------------------------------------------------------------------ calibration prompts
def _article(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _plural(word: str) -> str:
    return f"{word}es" if word.endswith("s") else f"{word}s"


_NUMBERS = {2: "two", 3: "three", 4: "four"}


def _draw(tag: str, rng: np.random.Generator, names: list[str]) -> dict:
    """One GenEval-style entry of ``tag``, with the distributions of GenEval's ``create_prompts.py``
    (distinct classes where there are two; no coloured "person"; counts 2-4; distinct colours)."""
    coloured = [n for n in names if n != "person"]
    if tag == "two_object":
        a, b = (names[i] for i in rng.choice(len(names), size=2, replace=False))
        return dict(
            tag=tag,
            include=[{"class": a, "count": 1}, {"class": b, "count": 1}],
            prompt=f"a photo of {_article(a)} and {_article(b)}",
        )
    if tag == "counting":
        obj, n = names[rng.integers(len(names))], int(rng.integers(2, 5))
        return dict(
            tag=tag,
            include=[{"class": obj, "count": n}],
            exclude=[{"class": obj, "count": n + 1}],
            prompt=f"a photo of {_NUMBERS[n]} {_plural(obj)}",
        )
    if tag == "colors":
        obj, colour = coloured[rng.integers(len(coloured))], COLOURS[rng.integers(len(COLOURS))]
        return dict(
            tag=tag,
            include=[{"class": obj, "count": 1, "color": colour}],
            prompt=f"a photo of {_article(colour)} {obj}",
        )
    if tag == "position":
        a, b = (names[i] for i in rng.choice(len(names), size=2, replace=False))
        rel = RELATIONS[rng.integers(len(RELATIONS))]
        return dict(
            tag=tag,
            include=[{"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}],
            prompt=f"a photo of {_article(a)} {rel} {_article(b)}",
        )
    if tag == "color_attr":
        a, b = (coloured[i] for i in rng.choice(len(coloured), size=2, replace=False))
        ca, cb = (COLOURS[i] for i in rng.choice(len(COLOURS), size=2, replace=False))
        return dict(
            tag=tag,
            include=[{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}],
            prompt=f"a photo of {_article(ca)} {a} and {_article(cb)} {b}",
        )
    raise ValueError(f"no calibration template for tag {tag!r}")


def content_key(entry: dict) -> tuple:
    """What an entry asks for, independent of wording and clause order: (tag, sorted clauses)."""

    def clauses(key):
        return tuple(sorted(json.dumps(c, sort_keys=True) for c in entry.get(key, [])))

    return entry["tag"], clauses("include"), clauses("exclude")


def calibration_metadata(per_tag: int = CALIBRATION_PER_TAG, seed: int = CALIBRATION_SEED) -> list[dict]:
    """GenEval-style entries for calibration, none of whose prompt text or content (``content_key``)
    occurs in the evaluation files, nor twice. ``single_object`` has none: GenEval's 80 single-object
    prompts use every COCO class, so each possible one is an evaluation prompt."""
    names = object_names()
    evaluation = load_metadata("short") + load_metadata("long")
    texts = {e["prompt"] for e in evaluation}
    taken = {content_key(e) for e in evaluation}
    rng = np.random.default_rng(seed)
    out = []
    for tag in TAGS[1:]:
        made = 0
        while made < per_tag:
            entry = _draw(tag, rng, names)
            key = content_key(entry)
            if entry["prompt"] in texts or key in taken:
                continue
            texts.add(entry["prompt"])
            taken.add(key)
            out.append(entry)
            made += 1
    return out


def write_calibration_metadata(path=None) -> Path:
    """(Re)write ``data/geneval/calibration_metadata.jsonl`` from ``calibration_metadata()``."""
    path = Path(path) if path is not None else DATA_DIR / CALIBRATION_FILE
    path.write_text("".join(json.dumps(e) + "\n" for e in calibration_metadata()))
    return path


def calibration_pairs(spec: dict) -> list[tuple[str, int]]:
    """(prompt text, seed) pairs for generation calibration, from ``calibration_metadata.jsonl``, with
    the evaluation's subset and seed rules (``max_prompts_per_tag``, ``samples_per_prompt``,
    ``gen_seed``). Stream them through ``model.generate_images`` as the evaluation does."""
    spec = {**GENEVAL_DEFAULTS, **(spec or {})}
    entries = read_metadata(DATA_DIR / CALIBRATION_FILE)
    return [
        (e["prompt"], sample_seed(spec["gen_seed"], i, k))
        for i, e in select_prompts(entries, spec["max_prompts_per_tag"])
        for k in range(int(spec["samples_per_prompt"]))
    ]


# ------------------------------------------------------------------------------------------- the scorer
class Detection(NamedTuple):
    """One detected object: box (x0, y0, x1, y1) in pixels with exclusive ends (mmdet's ``mask2bbox``
    convention), mask (H x W bool, or None: then the colour classifier sees the whole image), score."""

    box: tuple
    mask: np.ndarray | None
    score: float


#: how the scorer asks for colours: (class name, counted detections) -> one colour name each
ColourFn = Callable[[str, Sequence[Detection]], list]


def filter_detections(detections: dict, tag: str) -> dict:
    """GenEval's kept detections: score strictly above the threshold (0.9 for every class when the
    tag is counting, else 0.3), highest first, at most 16 per class; no NMS; empty classes dropped."""
    threshold = COUNTING_THRESHOLD if tag == "counting" else THRESHOLD
    kept = {}
    for name, dets in detections.items():
        good = sorted((Detection(*d) for d in dets if d[2] > threshold), key=lambda d: -d.score)[:MAX_OBJECTS]
        if good:
            kept[name] = good
    return kept


def relations(obj_box: Sequence[float], target_box: Sequence[float]) -> set:
    """Where the object stands relative to the target, boxes (x0, y0, x1, y1): GenEval's rule on box
    centres, ``worlds.shapes.box_relations`` (one implementation serves both benchmarks)."""
    a, b = np.asarray(obj_box[:4], dtype=np.float64), np.asarray(target_box[:4], dtype=np.float64)
    offset = (a[:2] + a[2:]) / 2 - (b[:2] + b[2:]) / 2
    dims = (a[2:] - a[:2]) + (b[2:] - b[:2])
    return set(box_relations(offset, dims))


def colour_requests(kept: dict, entry: dict) -> list[tuple[str, int]]:
    """(class, count) of the colour checks ``judge`` will make on these detections, so that a runner
    can classify every needed crop in one batch before scoring."""
    return [
        (req["class"], req["count"])
        for req in entry.get("include", [])
        if "color" in req and len(kept.get(req["class"], [])) >= req["count"]
    ]


def judge(kept: dict, entry: dict, colours: ColourFn) -> tuple[bool, str]:
    """GenEval's verdict on one image from its kept detections (``filter_detections``): (correct,
    reason). Every clause is checked (reasons accumulate); position is checked only for a clause
    whose count and colour passed, against the counted objects of the clause it refers to."""
    correct, reasons, groups = True, [], []
    for req in entry.get("include", []):
        name, count = req["class"], req["count"]
        found = kept.get(name, [])[:count]
        ok = len(found) >= count
        if not ok:
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        if ok and "color" in req:
            got = list(colours(name, found))
            if any(c != req["color"] for c in got) or len(got) != len(found):
                ok = False
                reasons.append(f"expected {req['color']} {name}>={count}, found colours {got}")
        if ok and "position" in req:
            rel, target = req["position"]
            if not 0 <= target < len(groups):
                raise ValueError(f"position clause refers to include clause {target}, not an earlier one: {entry}")
            if groups[target] is None:
                ok = False
                reasons.append(f"no target for {name} to be {rel}")
            else:
                for obj in found:
                    bad = next((t for t in groups[target] if rel not in relations(obj.box, t.box)), None)
                    if bad is not None:
                        ok = False
                        held = " and ".join(sorted(relations(obj.box, bad.box))) or "no relation"
                        reasons.append(f"expected {name} {rel} target, found {held}")
                        break
        groups.append(found if ok else None)
        correct = correct and ok
    for req in entry.get("exclude", []):
        n = len(kept.get(req["class"], []))
        if n >= req["count"]:
            correct = False
            reasons.append(f"expected {req['class']}<{req['count']}, found {n}")
    return correct, "\n".join(reasons)


def score_image(detections: dict, entry: dict, colours: ColourFn) -> tuple[bool, str]:
    """``judge`` on raw detections (``{class: [(box, mask, score), ...]}``): threshold, cap, verdict."""
    return judge(filter_detections(detections, entry["tag"]), entry, colours)


def summarize(per_image: Iterable[dict]) -> dict:
    """Per-tag accuracy over images, "overall" = unweighted mean of the six tags (keyed by name, so
    the order of the records does not matter), and standard errors under "se" as
    ``shapes.geneval_scores`` computes them: per tag clustered by prompt (a prompt's samples are not
    independent), the overall one combining the tags' as independent estimates (``shapes.tag_accuracies``)."""
    by_tag = {t: {} for t in TAGS}
    n = 0
    for r in per_image:
        if r["tag"] not in by_tag:
            raise ValueError(f"unknown GenEval tag {r['tag']!r}")
        by_tag[r["tag"]].setdefault(r.get("index", r["prompt"]), []).append(bool(r["correct"]))
        n += 1
    scores, se = tag_accuracies(by_tag)
    per_tag = {t: scores[t] for t in TAGS}
    prompts = [any(v) for t in TAGS for v in by_tag[t].values()]
    return {
        "overall": scores["overall"],
        "per_tag": per_tag,
        "se": se,
        "n_images": n,
        "n_prompts": len(prompts),
        "prompts_any_correct": float(np.mean(prompts)),
    }


# ------------------------------------------------------------------------------------------- the models
def _pretrained(cls, name: str, cache_dir=None, revision=None, **kwargs):
    """``cls.from_pretrained`` at ``revision`` (None: the cache's refs/main) from the local Hugging Face
    cache only: evaluation never downloads."""
    try:
        return cls.from_pretrained(name, local_files_only=True, cache_dir=cache_dir, revision=revision, **kwargs)
    except OSError as err:
        at = f"@{revision}" if revision else ""
        raise OSError(
            f"{name}{at} is not in the local Hugging Face cache (HF_HUB_CACHE / HF_HOME); a study fetches "
            f"it with its download rule (hub.inputs, a lock under data/), or fetch it once where the network "
            f"is reachable (`unisparse fetch-input --lock LOCK --out MANIFEST`): {err}"
        ) from err


def _as_uint8(image) -> np.ndarray:
    """An RGB image as an H x W x 3 uint8 array (PIL images are converted as GenEval loads them)."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an H x W x 3 uint8 array, got {image.dtype} {image.shape}")
        return image
    return np.array(image.convert("RGB"))


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Boxes (x0, y0, x1, y1) of [N, H, W] bool masks, ends exclusive; empty masks give zeros (mmdet's
    ``mask2bbox``), computed on the masks' device without a loop."""
    n, h, w = masks.shape
    cols, rows = masks.any(dim=1), masks.any(dim=2)  # [N, W], [N, H]
    x0 = cols.int().argmax(dim=1)
    x1 = w - cols.flip(1).int().argmax(dim=1)
    y0 = rows.int().argmax(dim=1)
    y1 = h - rows.flip(1).int().argmax(dim=1)
    boxes = torch.stack([x0, y0, x1, y1], dim=1).float()
    return boxes * cols.any(dim=1, keepdim=True)


class Detector:
    """Mask2Former (transformers) producing GenEval's per-class detections the way mmdet's
    Mask2Former instance head does, for batches of images.

    Kept from mmdet (``mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco``, ``MaskFormerFusionHead``):
    the test-time resize (shorter side 800, longer at most 1333, bilinear on the uint8 image, rounded),
    ImageNet normalisation, zero padding to a multiple of 32; mask logits upsampled bilinearly to the
    padded input, cropped to the resized image, upsampled bilinearly to the original size; the top
    ``max_per_image`` (100) (query, class) pairs by softmax probability (the no-object class
    excluded); binary mask = logit > 0; score = class probability x mean sigmoid inside the binary
    mask; box = the binary mask's extent. Post-processing runs in fp32.

    Where it differs:
    * the weights: transformers' ``facebook/mask2former-swin-small-coco-instance`` is the Detectron2
      Swin-S COCO instance model, not mmdet's checkpoint; scores and masks differ somewhat, so numbers
      are not interchangeable with the official scorer's (say so next to any number);
    * transformers' own ``post_process_instance_segmentation`` is NOT used: it resizes mask logits to
      a fixed 384 x 384 (ignoring the input's size, aspect and padding), scores and binarises there,
      and brings binary masks to the target size by nearest-neighbour resizing; it drops pairs below
      0.5 and empty masks, and returns no boxes. Its processor also resizes to the checkpoint's
      processor size, not mmdet's 800/1333 test scale. Only the processor's mean and std are used;
    * candidates scoring at most ``min_score`` (0.3, GenEval's lowest threshold, which is strict) are
      dropped here to save host memory: they can never count, so the verdicts are unchanged;
    * padding: mmdet pads after normalising, with zeros, and so do we; within a batch of unequal
      sizes both pad to the largest (GenEval scores one image at a time, and its images are square);
    * image loading: mmdet reads with OpenCV (BGR, converted to RGB); we get RGB uint8 arrays.
    """

    def __init__(
        self,
        name: str = DEFAULT_DETECTOR,
        device="cpu",
        dtype=torch.float32,
        cache_dir=None,
        revision=None,
        batch_size: int = 4,
        test_scale: tuple = (800, 1333),
        size_divisor: int = 32,
        max_per_image: int = 100,
        min_score: float = THRESHOLD,
    ):
        from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

        processor = _pretrained(AutoImageProcessor, name, cache_dir, revision)
        self.model = _pretrained(Mask2FormerForUniversalSegmentation, name, cache_dir, revision, dtype=dtype)
        self.model.to(device).eval()
        self.device, self.dtype = torch.device(device), dtype
        self.classnames = object_names()
        if self.model.config.num_labels != len(self.classnames):
            raise ValueError(f"{name} has {self.model.config.num_labels} classes; GenEval needs the 80 COCO classes")
        # GenEval names classes by index in COCO order (it renames mouse, remote and keyboard)
        self.mean = torch.tensor(processor.image_mean, device=device, dtype=torch.float32).view(3, 1, 1) * 255
        self.std = torch.tensor(processor.image_std, device=device, dtype=torch.float32).view(3, 1, 1) * 255
        self.batch_size, self.test_scale, self.size_divisor = int(batch_size), tuple(test_scale), int(size_divisor)
        self.max_per_image, self.min_score = int(max_per_image), float(min_score)

    def resized_size(self, h: int, w: int) -> tuple[int, int]:
        """mmdet's keep-ratio rescale: the largest scale with short side <= 800 and long side <= 1333."""
        short, long = self.test_scale
        scale = min(short / min(h, w), long / max(h, w))
        return int(h * scale + 0.5), int(w * scale + 0.5)

    def _inputs(self, images: list[np.ndarray]):
        """Resized, normalised, padded batch on the device, and each image's resized size."""
        tensors, sizes = [], []
        for img in images:
            x = torch.from_numpy(img if img.flags.writeable else img.copy()).to(self.device).permute(2, 0, 1).float()
            size = self.resized_size(*img.shape[:2])
            x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0].round().clamp(0, 255)
            tensors.append((x - self.mean) / self.std)
            sizes.append(size)
        d = self.size_divisor
        hp = -(-max(s[0] for s in sizes) // d) * d
        wp = -(-max(s[1] for s in sizes) // d) * d
        batch = torch.stack([F.pad(x, (0, wp - x.shape[2], 0, hp - x.shape[1])) for x in tensors])
        return batch.to(self.dtype), sizes

    def _postprocess(self, class_logits, mask_logits, padded, resized, original) -> dict:
        """One image's detections from its query outputs, as mmdet's instance head makes them."""
        masks = F.interpolate(mask_logits[None].float(), size=padded, mode="bilinear", align_corners=False)
        masks = masks[:, :, : resized[0], : resized[1]]
        masks = F.interpolate(masks, size=original, mode="bilinear", align_corners=False)[0]  # [Q, H, W]
        binary = masks > 0
        mask_score = (masks.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
        probs = class_logits.float().softmax(-1)[:, :-1]  # [Q, C]; the last class is "no object"
        n_classes = probs.shape[1]
        top, flat = probs.flatten().topk(min(self.max_per_image, probs.numel()))
        query, label = flat // n_classes, flat % n_classes
        scores = top * mask_score[query]
        keep = scores > self.min_score
        query, label, scores = query[keep], label[keep], scores[keep]
        kept_masks = binary[query]
        boxes = mask_boxes(kept_masks)
        out: dict = {}
        for box, m, lab, s in zip(boxes.cpu().numpy(), kept_masks.cpu().numpy(), label.tolist(), scores.tolist()):
            out.setdefault(self.classnames[lab], []).append(Detection(tuple(float(v) for v in box), m, float(s)))
        return {k: sorted(v, key=lambda d: -d.score) for k, v in out.items()}

    @torch.no_grad()
    def __call__(self, images: Sequence) -> list[dict]:
        """Per image, ``{class name: [Detection, ...]}`` sorted by score (every candidate above
        ``min_score``; ``filter_detections`` applies GenEval's thresholds)."""
        arrays = [_as_uint8(img) for img in images]
        results = []
        for i in range(0, len(arrays), self.batch_size):
            chunk = arrays[i : i + self.batch_size]
            batch, sizes = self._inputs(chunk)
            out = self.model(pixel_values=batch)
            for j, img in enumerate(chunk):
                results.append(
                    self._postprocess(
                        out.class_queries_logits[j],
                        out.masks_queries_logits[j],
                        tuple(batch.shape[-2:]),
                        sizes[j],
                        img.shape[:2],
                    )
                )
        return results


def _features(output) -> torch.Tensor:
    """CLIP's projected embeddings (transformers 5 returns a model output, earlier versions a tensor)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ColourClassifier:
    """GenEval's colour check: CLIP zero-shot over the 10 colours with GenEval's three templates per
    colour (class embedding = normalised mean of the normalised template embeddings, as
    clip_benchmark builds it), on each object's mask composited over #999999 and cropped to its box.

    Preprocessing is open_clip's for OpenAI ViT-L/14, done on the host with PIL: shorter side to 224
    (bicubic), centre crop 224, the processor's mean and std. GenEval used open_clip's ViT-L-14
    "openai" weights; ``openai/clip-vit-large-patch14`` holds the same weights converted. Text
    classifiers are cached per class name, as GenEval caches them."""

    def __init__(
        self,
        name: str = DEFAULT_CLIP,
        device="cpu",
        dtype=torch.float32,
        cache_dir=None,
        batch_size: int = 32,
        revision=None,
    ):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        self.tokenizer = _pretrained(AutoTokenizer, name, cache_dir, revision)
        processor = _pretrained(AutoImageProcessor, name, cache_dir, revision)
        self.model = _pretrained(CLIPModel, name, cache_dir, revision, dtype=dtype)
        self.model.to(device).eval()
        self.device, self.dtype, self.batch_size = torch.device(device), dtype, int(batch_size)
        size = processor.size
        self.resize = int(size["shortest_edge"] if "shortest_edge" in size else min(size["height"], size["width"]))
        crop = processor.crop_size
        self.crop = (int(crop["height"]), int(crop["width"]))
        self.mean = np.asarray(processor.image_mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(processor.image_std, dtype=np.float32).reshape(3, 1, 1)
        self._text: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def text_weights(self, classname: str) -> torch.Tensor:
        """[embed dim, 10] zero-shot weights for one class name (cached)."""
        if classname not in self._text:
            texts = [t.format(c=c, obj=classname) for c in COLOURS for t in COLOUR_TEMPLATES]
            tok = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
            emb = _features(self.model.get_text_features(**tok)).float()
            emb = F.normalize(emb, dim=-1).view(len(COLOURS), len(COLOUR_TEMPLATES), -1).mean(1)
            self._text[classname] = F.normalize(emb, dim=-1).T
        return self._text[classname]

    def crop_pixels(self, image, det: Detection) -> np.ndarray:
        """The normalised [3, 224, 224] input for one object: mask over grey, cropped to its box."""
        from PIL import Image

        img = Image.fromarray(_as_uint8(image))
        if det.mask is not None:
            if det.mask.shape != (img.height, img.width):
                raise ValueError(f"mask {det.mask.shape} does not match image {(img.height, img.width)}")
            img = Image.composite(img, Image.new("RGB", img.size, GREY), Image.fromarray(np.asarray(det.mask, bool)))
        img = img.crop(tuple(det.box[:4]))  # PIL rounds the float box, as GenEval's crop does
        w, h = img.size
        short = self.resize
        size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        img = img.resize(size, Image.BICUBIC)
        ch, cw = self.crop
        top, left = int(round((size[1] - ch) / 2.0)), int(round((size[0] - cw) / 2.0))
        img = img.crop((left, top, left + cw, top + ch))
        x = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
        return (x - self.mean) / self.std

    @torch.no_grad()
    def classify(self, requests: Sequence[tuple]) -> list[list[str]]:
        """Colours for many (image, detections, class name) requests at once, batched across images."""
        crops, owners = [], []
        for r, (image, dets, name) in enumerate(requests):
            for det in dets:
                crops.append(self.crop_pixels(image, det))
                owners.append((r, name))
        answers: list[list[str]] = [[] for _ in requests]
        for i in range(0, len(crops), self.batch_size):
            owned = owners[i : i + self.batch_size]
            pixels = torch.from_numpy(np.stack(crops[i : i + self.batch_size])).to(self.device, self.dtype)
            feats = F.normalize(_features(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)
            weights = torch.stack([self.text_weights(name) for _, name in owned])  # [B, D, 10]
            best = torch.einsum("bd,bdk->bk", feats, weights).argmax(1).tolist()  # one host sync per batch
            for (r, _), k in zip(owned, best):
                answers[r].append(COLOURS[k])
        return answers

    def __call__(self, image, dets: Sequence[Detection], classname: str) -> list[str]:
        return self.classify([(image, dets, classname)])[0]


# ------------------------------------------------------------------------------------------- the runner
def _folder(out_dir: Path, index: int) -> Path:
    return out_dir / f"{index:05d}"


def _png(folder: Path, k: int) -> Path:
    return folder / "samples" / f"{k:04d}.png"


@torch.no_grad()
def generate_folder(
    model, tokenizer, items: Sequence[tuple[int, dict]], out_dir, spec: dict, progress: bool = False
) -> int:
    """Generate ``samples_per_prompt`` images per (index, entry) with fixed seeds (``sample_seed``) and
    save them in GenEval's layout: ``{out_dir}/{index:05d}/metadata.jsonl`` (the entry, one JSON object)
    and ``{out_dir}/{index:05d}/samples/{k:04d}.png``. Returns the number of images."""
    from PIL import Image
    from tqdm import tqdm

    out_dir = Path(out_dir)
    sampler = sampler_settings(spec)
    n = int(spec["samples_per_prompt"])
    jobs = [(i, e, k, sample_seed(spec["gen_seed"], i, k)) for i, e in items for k in range(n)]
    for i, e in items:
        (_folder(out_dir, i) / "samples").mkdir(parents=True, exist_ok=True)
        (_folder(out_dir, i) / "metadata.jsonl").write_text(json.dumps(e) + "\n")
    bs = int(spec["batch_size"])
    for start in tqdm(range(0, len(jobs), bs), desc="geneval generate", disable=not progress):
        chunk = jobs[start : start + bs]
        ids = [tokenizer.encode(e["prompt"]) for _, e, _, _ in chunk]
        images = model.generate_images(ids, [s for *_, s in chunk], **sampler)
        pixels = images.float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu().numpy()
        for (i, _, k, _), px in zip(chunk, pixels):
            Image.fromarray(px).save(_png(_folder(out_dir, i), k))
    return len(jobs)


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        return np.array(ImageOps.exif_transpose(img).convert("RGB"))


def score_folder(
    folder, detector, classifier, indices: Iterable[int] | None = None, batch_size: int = 8, progress: bool = False
) -> list[dict]:
    """Score a GenEval image folder (ours, or any model's in GenEval's layout): one record per image
    with the official results' fields (``filename``, ``tag``, ``prompt``, ``correct``, ``reason``,
    ``metadata`` and ``details`` as JSON strings) plus ``index`` and ``sample``. ``indices``: only
    these prompt folders (default: every numeric subfolder)."""
    from tqdm import tqdm

    folder = Path(folder)
    wanted = None if indices is None else set(int(i) for i in indices)
    images = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()):
        index = int(sub.name)
        if wanted is not None and index not in wanted:
            continue
        entry = json.loads((sub / "metadata.jsonl").read_text())
        for png in sorted((sub / "samples").iterdir()):
            if png.is_file() and re.fullmatch(r"\d+\.png", png.name):
                images.append((index, int(png.stem), entry, png))
    records = []
    for start in tqdm(range(0, len(images), batch_size), desc="geneval score", disable=not progress):
        chunk = images[start : start + batch_size]
        pixels = [_read_image(p) for *_, p in chunk]
        kept = [filter_detections(d, e["tag"]) for d, (_, _, e, _) in zip(detector(pixels), chunk)]
        requests, where = [], {}
        for j, ((_, _, e, _), k) in enumerate(zip(chunk, kept)):
            for name, count in colour_requests(k, e):
                where[(j, name, count)] = len(requests)
                requests.append((pixels[j], k[name][:count], name))
        answers = classifier.classify(requests) if requests else []
        for j, ((index, sample, e, png), k) in enumerate(zip(chunk, kept)):
            correct, reason = judge(k, e, lambda name, found, j=j: answers[where[(j, name, len(found))]])
            records.append(
                {
                    "filename": str(png.relative_to(folder)),
                    "index": index,
                    "sample": sample,
                    "tag": e["tag"],
                    "prompt": e["prompt"],
                    "correct": bool(correct),
                    "reason": reason,
                    "metadata": json.dumps(e),
                    "details": json.dumps({n: [[*d.box, d.score] for d in ds] for n, ds in k.items()}),
                }
            )
    return records


def run_geneval(
    model, tokenizer, spec: dict | None, out_dir, progress: bool = False, detector=None, classifier=None
) -> dict:
    """Generate GenEval's images for ``spec`` (``GENEVAL_DEFAULTS`` keys) into ``out_dir`` and score
    them. Returns ``{"overall", "per_tag", "se", "n_images", "n_prompts", "prompts_any_correct",
    "per_image"}``; the per-image records also go to ``{out_dir}/results.jsonl`` (readable by
    GenEval's ``summary_scores.py``). The detector and colour classifier are loaded from the local
    Hugging Face cache on the model's device in fp32 unless given."""
    spec = {**GENEVAL_DEFAULTS, **(spec or {})}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    items = select_prompts(load_metadata(spec["geneval_prompts"]), spec["max_prompts_per_tag"])
    t0 = time.perf_counter()
    generate_folder(model, tokenizer, items, out_dir, spec, progress)
    t1 = time.perf_counter()
    device = getattr(model, "device", "cpu")
    detector = detector or Detector(
        spec["detector"], device=device, batch_size=spec["batch_size"], revision=spec["detector_revision"]
    )
    classifier = classifier or ColourClassifier(spec["clip"], device=device, revision=spec["clip_revision"])
    per_image = score_folder(out_dir, detector, classifier, [i for i, _ in items], spec["batch_size"], progress)
    t2 = time.perf_counter()
    for r in per_image:
        r["seed"] = sample_seed(spec["gen_seed"], r["index"], r["sample"])
    with open(out_dir / "results.jsonl", "w") as fp:
        for r in per_image:
            fp.write(json.dumps(r) + "\n")
    metrics = summarize(per_image)
    metrics.update(
        per_image=per_image, prompts=spec["geneval_prompts"], seconds={"generate": t1 - t0, "score": t2 - t1}
    )
    log.info(
        "GenEval (%s prompts) overall %.4f over %d images",
        spec["geneval_prompts"],
        metrics["overall"],
        metrics["n_images"],
    )
    return metrics


def throughput(
    detector, classifier, n_images: int = 8, image_size: int = 1024, objects_per_image: int = 2, seed: int = 0
) -> dict:
    """Scoring speed in images per second: detection of ``n_images`` random ``image_size`` squares
    plus CLIP colour classification of ``objects_per_image`` crops each (GenEval's colour tags classify
    one or two objects per image), after one warm-up image; the device is synchronised around each part."""
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8) for _ in range(n_images)]
    q = image_size // 4
    mask = np.zeros((image_size, image_size), bool)
    mask[q : 3 * q, q : 3 * q] = True
    objs = [Detection((q, q, 3 * q, 3 * q), mask, 1.0)] * objects_per_image
    detector(images[:1])
    classifier.classify([(images[0], objs, "car")])
    synchronize(detector.device)
    t0 = time.perf_counter()
    detector(images)
    synchronize(detector.device)
    t1 = time.perf_counter()
    classifier.classify([(img, objs, "car") for img in images])
    synchronize(classifier.device)
    t2 = time.perf_counter()
    return {
        "images_per_second": n_images / (t2 - t0),
        "detect_seconds_per_image": (t1 - t0) / n_images,
        "classify_seconds_per_image": (t2 - t1) / n_images,
        "n_images": n_images,
        "image_size": image_size,
        "objects_per_image": objects_per_image,
        **describe(detector.device, detector.dtype),
    }
