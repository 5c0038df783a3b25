"""GenEval without mmdet: the committed prompt files, every scoring rule on hand-built detections, the
mmdet-style post-processing, and an end-to-end run on tiny random models loaded from a temporary
Hugging Face cache (no network: HF_HUB_OFFLINE=1)."""

import hashlib
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers.benchmarks import CLIP_COMMIT, DETECTOR_COMMIT, cache_repo, tiny_clip, tiny_detector
from unisparse.evaluate import geneval as g
from unisparse.evaluate.geneval import Detection

DATA = g.DATA_DIR
EPS = 1e-6


# ------------------------------------------------------------------------------------------- the files
def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_metadata_files_are_genevals():
    """553 prompts per file with the tag counts of GenEval (80/99/80/94/100/100); the long file differs
    from the short one only in its prompt texts; the sums recorded in SOURCE.md hold."""
    short, long = g.load_metadata("short"), g.load_metadata("long")
    counts = {"single_object": 80, "two_object": 99, "counting": 80, "colors": 94, "position": 100, "color_attr": 100}
    for entries in (short, long):
        assert len(entries) == 553
        assert {t: sum(e["tag"] == t for e in entries) for t in g.TAGS} == counts
    for a, b in zip(short, long):
        assert {k: v for k, v in a.items() if k != "prompt"} == {k: v for k, v in b.items() if k != "prompt"}
        assert a["prompt"] != b["prompt"]
    assert len({e["prompt"] for e in short}) == len({e["prompt"] for e in long}) == 553
    names = g.object_names()
    assert len(names) == 80 and names[0] == "person" and names[-1] == "toothbrush"
    assert {c["class"] for e in short for c in e["include"]} <= set(names)
    source = (DATA / "SOURCE.md").read_text()
    for name in ("evaluation_metadata.jsonl", "evaluation_metadata_long.jsonl", "object_names.txt"):
        assert _sha256(DATA / name) in source, f"SOURCE.md does not record the sha256 of {name}"
    with pytest.raises(ValueError, match="unknown variant"):
        g.load_metadata("medium")


def test_calibration_file_is_the_generators_and_disjoint_from_evaluation():
    committed = g.read_metadata(DATA / g.CALIBRATION_FILE)
    assert committed == g.calibration_metadata(), "rerun unisparse.evaluate.geneval.write_calibration_metadata()"
    assert (DATA / g.CALIBRATION_FILE).read_text() == "".join(json.dumps(e) + "\n" for e in committed)
    evaluation = g.load_metadata("short") + g.load_metadata("long")
    texts = {e["prompt"] for e in evaluation}
    contents = {g.content_key(e) for e in evaluation}
    includes = {(e["tag"], json.dumps(e["include"], sort_keys=True)) for e in evaluation}
    assert not texts & {e["prompt"] for e in committed}
    assert not contents & {g.content_key(e) for e in committed}
    assert not includes & {(e["tag"], json.dumps(e["include"], sort_keys=True)) for e in committed}
    assert len({g.content_key(e) for e in committed}) == len(committed)
    per_tag = {t: [e for e in committed if e["tag"] == t] for t in g.TAGS}
    assert {t: len(v) for t, v in per_tag.items()} == {"single_object": 0, **{t: 16 for t in g.TAGS[1:]}}
    # GenEval's formats: counting excludes N+1; colours never on a person; position refers to clause 0
    names = set(g.object_names())
    for e in committed:
        assert set(e) <= {"tag", "include", "exclude", "prompt"} and e["prompt"].startswith("a photo of ")
        assert all(c["class"] in names for c in e["include"])
        if e["tag"] == "counting":
            (inc,), (exc,) = e["include"], e["exclude"]
            assert 2 <= inc["count"] <= 4 and exc == {"class": inc["class"], "count": inc["count"] + 1}
        if e["tag"] in ("colors", "color_attr"):
            assert all(c["color"] in g.COLOURS and c["class"] != "person" for c in e["include"])
        if e["tag"] == "position":
            assert e["include"][1]["position"][0] in g.RELATIONS and e["include"][1]["position"][1] == 0


def test_calibration_pairs_follow_the_seed_scheme():
    pairs = g.calibration_pairs({"samples_per_prompt": 2, "max_prompts_per_tag": 3, "gen_seed": 7})
    assert len(pairs) == 5 * 3 * 2
    entries = g.read_metadata(DATA / g.CALIBRATION_FILE)
    index = {e["prompt"]: i for i, e in enumerate(entries)}
    for j, (text, seed) in enumerate(pairs):
        assert seed == 7 + g.SEED_STRIDE * index[text] + j % 2
    assert pairs == g.calibration_pairs({"samples_per_prompt": 2, "max_prompts_per_tag": 3, "gen_seed": 7})


def test_prompt_subsets_are_per_tag_deterministic_and_shared_by_both_variants():
    short = g.select_prompts(g.load_metadata("short"), 2)
    long = g.select_prompts(g.load_metadata("long"), 2)
    assert [i for i, _ in short] == [i for i, _ in long]
    assert sorted(e["tag"] for _, e in short) == sorted(g.TAGS * 2)
    assert len(g.select_prompts(g.load_metadata("short"), None)) == 553
    assert g.sample_seed(5, 12, 3) == 5 + 12 * g.SEED_STRIDE + 3


# ------------------------------------------------------------------------------------------- the rules
def det(x0, y0, x1, y1, score=0.95):
    return Detection((float(x0), float(y0), float(x1), float(y1)), None, score)


def colours_always(colour):
    return lambda name, found: [colour] * len(found)


NO_COLOURS = colours_always("none")


def entry(tag, include, exclude=None):
    e = {"tag": tag, "include": include, "prompt": f"{tag} {json.dumps(include)}"}
    if exclude:
        e["exclude"] = exclude
    return e


def verdict(dets, e, colours=NO_COLOURS):
    return g.score_image(dets, e, colours)[0]


def test_single_and_two_objects():
    single = entry("single_object", [{"class": "cat", "count": 1}])
    assert verdict({"cat": [det(0, 0, 10, 10)]}, single)
    ok, reason = g.score_image({"dog": [det(0, 0, 10, 10)]}, single, NO_COLOURS)
    assert not ok and "cat>=1" in reason
    two = entry("two_object", [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}])
    assert verdict({"cat": [det(0, 0, 10, 10)], "dog": [det(20, 0, 30, 10)]}, two)
    assert not verdict({"cat": [det(0, 0, 10, 10)]}, two)
    assert not verdict({"dog": [det(0, 0, 10, 10)], "bird": [det(0, 0, 10, 10)]}, two)


def test_threshold_is_strictly_above_point_three():
    single = entry("single_object", [{"class": "cat", "count": 1}])
    assert not verdict({"cat": [det(0, 0, 10, 10, 0.3)]}, single)
    assert verdict({"cat": [det(0, 0, 10, 10, 0.3 + EPS)]}, single)
    assert verdict({"cat": [det(0, 0, 10, 10, 0.5)]}, single)


def counting(n, cls="cat"):
    return entry("counting", [{"class": cls, "count": n}], [{"class": cls, "count": n + 1}])


def boxes(n, score=0.95):
    return [det(20 * i, 0, 20 * i + 10, 10, score) for i in range(n)]


def test_counting_needs_exactly_n():
    for n in (2, 3, 4):
        assert verdict({"cat": boxes(n)}, counting(n))
        assert not verdict({"cat": boxes(n - 1)}, counting(n))
        ok, reason = g.score_image({"cat": boxes(n + 1)}, counting(n), NO_COLOURS)
        assert not ok and f"cat<{n + 1}" in reason  # N+1 fails through the exclude clause


def test_counting_threshold_is_strictly_above_point_nine_for_every_class():
    assert not verdict({"cat": boxes(2, 0.9)}, counting(2))
    assert verdict({"cat": boxes(2, 0.9 + EPS)}, counting(2))
    # a third cat at 0.9 does not count, so it cannot trip the exclude clause
    assert verdict({"cat": boxes(2, 0.95) + [det(100, 0, 110, 10, 0.9)]}, counting(2))
    # ... but it would under any other tag: 0.9 applies to counting prompts only, to every class
    two = entry("two_object", [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}])
    assert verdict({"cat": [det(0, 0, 5, 5, 0.5)], "dog": [det(9, 9, 12, 12, 0.5)]}, two)
    with_exclude = counting(2)
    with_exclude["exclude"].append({"class": "dog", "count": 1})
    assert verdict({"cat": boxes(2), "dog": [det(0, 0, 5, 5, 0.89)]}, with_exclude)
    assert not verdict({"cat": boxes(2), "dog": [det(0, 0, 5, 5, 0.91)]}, with_exclude)


def test_at_most_sixteen_detections_per_class_highest_first():
    many = [det(i, 0, i + 1, 1, 0.31 + 0.01 * i) for i in range(20)]
    random.Random(0).shuffle(many)
    kept = g.filter_detections({"cat": many}, "single_object")["cat"]
    assert len(kept) == g.MAX_OBJECTS == 16
    assert [d.score for d in kept] == sorted((0.31 + 0.01 * i for i in range(4, 20)), reverse=True)
    # the cap shows in verdicts: an exclude of 17 can never trip
    e = entry("single_object", [{"class": "cat", "count": 1}], [{"class": "cat", "count": 17}])
    assert verdict({"cat": many}, e)
    e["exclude"] = [{"class": "cat", "count": 16}]
    assert not verdict({"cat": many}, e)
    # no NMS: identical boxes all count
    assert len(g.filter_detections({"cat": [det(0, 0, 9, 9)] * 3}, "counting")["cat"]) == 3


def test_colour_of_every_counted_object():
    one = entry("colors", [{"class": "car", "count": 1, "color": "red"}])
    assert verdict({"car": [det(0, 0, 10, 10)]}, one, colours_always("red"))
    ok, reason = g.score_image({"car": [det(0, 0, 10, 10)]}, one, colours_always("blue"))
    assert not ok and "red car" in reason
    assert not verdict({"bus": [det(0, 0, 10, 10)]}, one, colours_always("red"))

    seen = []

    def first_red_then_blue(name, found):
        seen.append((name, [d.score for d in found]))
        return ["red", "blue"][: len(found)]

    two = entry("colors", [{"class": "car", "count": 2, "color": "red"}])
    cars = {"car": [det(0, 0, 9, 9, 0.5), det(20, 0, 29, 9, 0.99), det(40, 0, 49, 9, 0.7)]}
    assert not verdict(cars, two, first_red_then_blue)  # one wrong colour fails
    assert seen == [("car", [0.99, 0.7])]  # only the two highest-scoring cars are classified
    assert verdict(cars, two, colours_always("red"))
    # colour is not asked for when the count already failed
    seen.clear()
    assert not verdict({"car": [det(0, 0, 9, 9)]}, two, first_red_then_blue) and not seen


def test_colour_attribution():
    e = entry(
        "color_attr", [{"class": "car", "count": 1, "color": "red"}, {"class": "cup", "count": 1, "color": "blue"}]
    )
    by_class = {"car": "red", "cup": "blue"}
    fn = lambda name, found: [by_class[name]] * len(found)
    dets = {"car": [det(0, 0, 10, 10)], "cup": [det(20, 0, 30, 10)]}
    assert verdict(dets, e, fn)
    swapped = lambda name, found: [{"car": "blue", "cup": "red"}[name]] * len(found)
    assert not verdict(dets, e, swapped)
    one_wrong = lambda name, found: [{"car": "red", "cup": "green"}[name]] * len(found)
    assert not verdict(dets, e, one_wrong)
    assert not verdict({"car": [det(0, 0, 10, 10)]}, e, fn)


def position(rel):
    return entry("position", [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": [rel, 0]}])


# the cat's box for each relation to a dog at (40, 40, 60, 60); y grows downward
PLACES = {
    "left of": (0, 40, 20, 60),
    "right of": (80, 40, 100, 60),
    "above": (40, 0, 60, 20),
    "below": (40, 80, 60, 100),
}
DOG = det(40, 40, 60, 60)


@pytest.mark.parametrize("rel", g.RELATIONS)
def test_each_position_relation(rel):
    cat = det(*PLACES[rel])
    assert g.relations(cat.box, DOG.box) == {rel}
    assert verdict({"dog": [DOG], "cat": [cat]}, position(rel))
    for other in set(g.RELATIONS) - {rel}:
        ok, reason = g.score_image({"dog": [DOG], "cat": [cat]}, position(other), NO_COLOURS)
        assert not ok and f"cat {other} target" in reason


def test_position_margin_and_thresholds():
    # centres 10 apart in x; the margin 0.1 * (10 + 10) = 2 leaves 8: clearly right of
    assert g.relations((10, 0, 20, 10), (0, 0, 10, 10)) == {"right of"}
    # within the margin (offset 1 <= 0.1 * 20): no relation at all, so every relation fails
    assert g.relations((1, 0, 11, 10), (0, 0, 10, 10)) == set()
    assert g.relations((0, 0, 10, 10), (0, 0, 10, 10)) == set()
    for rel in g.RELATIONS:
        assert not verdict({"dog": [det(0, 0, 10, 10)], "cat": [det(1, 0, 11, 10)]}, position(rel))
    # diagonal: both components beyond 0.5 of the unshrunk length -> two relations
    assert g.relations((100, 100, 110, 110), (0, 0, 10, 10)) == {"right of", "below"}
    # the shrunk component is divided by the UNSHRUNK length: offset (10, 4) between 10-px boxes shrinks to
    # (8, 2), and 8 / |(10, 4)| = 0.74 > 0.5 -> right of; with (3, 20), x shrinks to 1, 1 / 20.2 < 0.5
    assert g.relations((10, 4, 20, 14), (0, 0, 10, 10)) == {"right of"}
    assert g.relations((3, 20, 13, 30), (0, 0, 10, 10)) == {"below"}


def test_position_needs_its_target_and_checks_every_pair():
    e = position("right of")
    ok, reason = g.score_image({"cat": [det(80, 40, 100, 60)]}, e, NO_COLOURS)
    assert not ok and "dog>=1" in reason and "no target for cat" in reason
    # two cats, two dogs: every counted cat must be right of every counted dog
    e2 = entry("position", [{"class": "dog", "count": 2}, {"class": "cat", "count": 2, "position": ["right of", 0]}])
    dogs = [det(0, 0, 10, 10), det(0, 50, 10, 60)]
    assert verdict({"dog": dogs, "cat": [det(50, 0, 60, 10), det(50, 50, 60, 60)]}, e2)
    assert not verdict({"dog": dogs, "cat": [det(50, 0, 60, 10), det(5, 100, 15, 110)]}, e2)
    # only the highest-scoring cat is counted when one is asked for
    low_cat_left = {"dog": [DOG], "cat": [det(*PLACES["right of"], 0.99), det(*PLACES["left of"], 0.4)]}
    assert verdict(low_cat_left, position("right of"))


def test_colour_requests_match_what_judge_asks():
    e = entry(
        "color_attr", [{"class": "car", "count": 1, "color": "red"}, {"class": "cup", "count": 2, "color": "blue"}]
    )
    kept = g.filter_detections({"car": [det(0, 0, 1, 1)], "cup": [det(0, 0, 1, 1)]}, e["tag"])
    asked = []
    g.judge(kept, e, lambda name, found: asked.append((name, len(found))) or ["red"] * len(found))
    assert g.colour_requests(kept, e) == asked == [("car", 1)]


def _records(correct_by_tag, samples=2):
    out, index = [], 0
    for t, (right, wrong) in correct_by_tag.items():
        for p in range(right + wrong):
            index += 1
            for k in range(samples):
                out.append({"tag": t, "prompt": f"{t}-{p}", "index": index, "correct": p < right})
    return out


def test_overall_is_the_mean_of_the_six_tags_keyed_by_name():
    spec = {
        "single_object": (3, 1),
        "two_object": (1, 3),
        "counting": (2, 2),
        "colors": (4, 0),
        "position": (0, 4),
        "color_attr": (1, 7),
    }
    records = _records(spec)
    expected = {t: r / (r + w) for t, (r, w) in spec.items()}
    out = g.summarize(records)
    assert out["per_tag"] == pytest.approx(expected)
    assert out["overall"] == pytest.approx(np.mean(list(expected.values())))  # not the mean over images
    assert out["n_images"] == len(records) and set(out["se"]) == {*g.TAGS, "overall"}
    for seed in range(3):
        shuffled = records[:]
        random.Random(seed).shuffle(shuffled)
        assert g.summarize(shuffled) == out
    # clustered by prompt: a tag with all prompts equal has zero error; a mixed one does not
    assert out["se"]["colors"] == 0.0 and out["se"]["counting"] > 0
    with pytest.raises(ValueError, match="no results"):
        g.summarize([r for r in records if r["tag"] != "position"])


# ------------------------------------------------------------------------------------------- post-processing
def test_mask_boxes_are_exclusive_extents():
    masks = torch.zeros(3, 8, 10, dtype=torch.bool)
    masks[0, 2:5, 3:7] = True
    masks[1, 7, 9] = True
    assert g.mask_boxes(masks).tolist() == [[3, 2, 7, 5], [9, 7, 10, 8], [0, 0, 0, 0]]


def _bare_detector():
    """A Detector without a model: its post-processing alone."""
    d = object.__new__(g.Detector)
    d.classnames, d.max_per_image, d.min_score = g.object_names(), 100, g.THRESHOLD
    d.test_scale, d.size_divisor = (800, 1333), 32
    return d


def test_postprocessing_scores_and_boxes_as_mmdet():
    """score = class probability x mean sigmoid inside the binary mask; box = the mask's extent at the
    original size; candidates at or below 0.3 never come back."""
    d = _bare_detector()
    q, c = 3, 80
    cls = torch.full((q, c + 1), -20.0)
    cat, dog = g.object_names().index("cat"), g.object_names().index("dog")
    cls[0, cat] = 10.0  # query 0: a cat, probability ~1
    cls[1, dog], cls[1, c] = 1.0, 0.0  # query 1: dog (0.73) or nothing
    cls[2, cat] = 10.0  # query 2: a cat whose mask is empty -> score 0
    logits = torch.full((q, 8, 8), -4.0)
    logits[0, 2:4, 4:8] = 2.0
    logits[1, 0:8, 0:2] = 1.0
    out = d._postprocess(cls, logits, padded=(32, 32), resized=(32, 32), original=(32, 32))
    assert set(out) == {"cat", "dog"} and len(out["cat"]) == 1
    # the same arithmetic by hand, after the same bilinear upsampling
    up = torch.nn.functional.interpolate(logits[None], size=(32, 32), mode="bilinear", align_corners=False)[0]
    for name, query in (("cat", 0), ("dog", 1)):
        m = up[query] > 0
        prob = cls[query].softmax(-1)[cat if name == "cat" else dog]
        expected = float(prob * up[query].sigmoid()[m].mean())
        (got,) = out[name]
        assert got.score == pytest.approx(expected, rel=1e-5)
        ys, xs = np.nonzero(m.numpy())
        assert got.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert got.mask.shape == (32, 32) and np.array_equal(got.mask, m.numpy())
    # the padding is cropped before the resize to the original size
    out2 = d._postprocess(cls, logits, padded=(32, 32), resized=(16, 32), original=(64, 128))
    assert out2["cat"][0].mask.shape == (64, 128)
    assert out2["cat"][0].box[3] > 40  # the cat's rows (8..16 of 32) fill the cropped half's lower part


def test_mmdet_test_scale():
    d = _bare_detector()
    assert d.resized_size(1024, 1024) == (800, 800)
    assert d.resized_size(512, 512) == (800, 800)
    assert d.resized_size(600, 2000) == (400, 1333)


# ------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory):
    """A Hugging Face cache holding tiny stand-ins under the real names. The selected colors prompt's class
    is the one the detector always sees, so the run exercises the colour classifier."""
    root = tmp_path_factory.mktemp("hf")
    first = g.select_prompts(g.load_metadata("long"), 1)
    favour = next(e for _, e in first if e["tag"] == "colors")["include"][0]["class"]
    tiny_detector(root / "saved-detector", favour)
    tiny_clip(root / "saved-clip")
    cache = root / "hub"
    cache_repo(cache, g.DEFAULT_DETECTOR, DETECTOR_COMMIT, root / "saved-detector")
    cache_repo(cache, g.DEFAULT_CLIP, CLIP_COMMIT, root / "saved-clip")
    return cache, favour


@pytest.fixture
def offline_cache(hf_cache, monkeypatch):
    """HF_HUB_OFFLINE=1 and HF_HUB_CACHE at the temporary cache, for this process (huggingface_hub read
    both at import, so its constants are set too)."""
    import huggingface_hub.constants

    cache, favour = hf_cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache, favour


@pytest.fixture(scope="module")
def tiny_bagel(tmp_path_factory):
    from unisparse.models.bagel import load_bagel, write_fake_checkpoint
    from unisparse.text import tokenizer_for

    src = tmp_path_factory.mktemp("bagel")
    write_fake_checkpoint(src)
    return load_bagel(src, dtype=torch.float32, image_size=64, vit_image_size=28), tokenizer_for(src)


def test_models_load_from_the_cache_only(offline_cache, tmp_path):
    cache, _ = offline_cache
    det = g.Detector(device="cpu")
    assert det.classnames == g.object_names()
    clf = g.ColourClassifier(device="cpu")
    img = np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    mask = np.zeros((48, 40), bool)
    mask[10:30, 5:25] = True
    objs = [Detection((5.0, 10.0, 25.0, 30.0), mask, 0.9), Detection((0.0, 0.0, 40.0, 48.0), None, 0.8)]
    got = clf(img, objs, "car")
    assert len(got) == 2 and set(got) <= set(g.COLOURS)
    assert clf.classify([(img, objs, "car"), (img, objs[:1], "cup")]) == [got, [got[0]]]  # batching changes nothing
    assert tuple(clf.text_weights("car").shape) == (8, 10)
    with pytest.raises(OSError, match="not in the local Hugging Face cache"):
        g.Detector("facebook/no-such-model")


def test_crop_is_the_mask_over_grey_cropped_to_the_box(offline_cache):
    clf = g.ColourClassifier(device="cpu")
    clf.resize, clf.crop = 8, (8, 8)
    clf.mean, clf.std = np.zeros((3, 1, 1), np.float32), np.ones((3, 1, 1), np.float32)
    img = np.zeros((16, 16, 3), np.uint8)
    img[:] = (255, 0, 0)
    mask = np.zeros((16, 16), bool)
    mask[4:12, 4:8] = True  # left half of the box is object, right half background
    x = clf.crop_pixels(img, Detection((4.0, 4.0, 12.0, 12.0), mask, 1.0))
    assert x.shape == (3, 8, 8)
    assert np.allclose(x[:, :, :3], np.array([1.0, 0.0, 0.0])[:, None, None], atol=0.02)
    assert np.allclose(x[:, :, 5:], 0x99 / 255, atol=0.02)


def test_run_geneval_end_to_end(offline_cache, tiny_bagel, tmp_path):
    _, favour = offline_cache
    model, tokenizer = tiny_bagel
    spec = dict(
        geneval_prompts="short",
        samples_per_prompt=1,
        max_prompts_per_tag=1,
        gen_seed=3,
        batch_size=4,
        num_steps=2,
        cfg_scale=2.0,
    )
    out = tmp_path / "geneval"
    metrics = g.run_geneval(model, tokenizer, spec, out)
    chosen = g.select_prompts(g.load_metadata("short"), 1)
    assert len(chosen) == 6
    for index, e in chosen:
        folder = out / f"{index:05d}"
        assert json.loads((folder / "metadata.jsonl").read_text()) == e
        assert sorted(p.name for p in (folder / "samples").iterdir()) == ["0000.png"]
        from PIL import Image

        with Image.open(folder / "samples" / "0000.png") as im:
            assert im.size == (64, 64) and im.mode == "RGB"
    assert set(metrics) >= {"overall", "per_tag", "se", "n_images", "per_image"}
    assert metrics["n_images"] == 6 and set(metrics["per_tag"]) == set(g.TAGS)
    assert 0.0 <= metrics["overall"] <= 1.0 and set(metrics["se"]) == {*g.TAGS, "overall"}
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert lines == metrics["per_image"]
    for r in lines:
        assert {"filename", "tag", "prompt", "correct", "reason", "metadata", "details"} <= set(r)
        assert re.fullmatch(r"\d{5}/samples/\d+\.png", r["filename"])
        assert r["seed"] == g.sample_seed(3, r["index"], r["sample"])
    # the detector always sees the colors prompt's class, so its colour was asked of CLIP
    colors = next(r for r in lines if r["tag"] == "colors")
    assert favour in json.loads(colors["details"])
    assert colors["correct"] or "expected" in colors["reason"]
    # the same seeds give the same images; another batch size changes them by float rounding only
    assert g.generate_folder(model, tokenizer, chosen, tmp_path / "again", spec) == 6
    assert g.generate_folder(model, tokenizer, chosen, tmp_path / "other", {**spec, "batch_size": 5}) == 6
    for index, _ in chosen:
        png = Path(f"{index:05d}") / "samples" / "0000.png"
        assert (out / png).read_bytes() == (tmp_path / "again" / png).read_bytes()
        a, b = (g._read_image(d / png).astype(int) for d in (out, tmp_path / "other"))
        assert np.abs(a - b).max() <= 1


def test_throughput_reports_images_per_second(offline_cache):
    det, clf = g.Detector(device="cpu"), g.ColourClassifier(device="cpu")
    out = g.throughput(det, clf, n_images=2, image_size=64)
    assert out["images_per_second"] > 0 and out["n_images"] == 2 and out["device"] == "cpu"
