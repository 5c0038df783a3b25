"""Tests for the shapes world: the judge must be exact, splits sound, QA correct."""

import itertools
from collections import Counter

import numpy as np
import pytest

from unisparse.worlds import shapes as S


def _prompt(text):
    return next(p for p in S.all_gen_prompts() if p.text == text)


def _img(*objs):
    return S.render(S.Scene(tuple(S.Obj(*o) for o in objs)))


# --- world -----------------------------------------------------------------


def test_templates_distinct_and_render_shape():
    for a, b in itertools.combinations(S.SHAPES, 2):
        ta, tb = S.TEMPLATES[a], S.TEMPLATES[b]
        assert (ta & tb).sum() / (ta | tb).sum() <= 0.8, (a, b)
    img = _img(("square", "red", 3))
    assert img.shape == (S.CANVAS, S.CANVAS, 3) and img.dtype == np.float32
    assert img.min() == 0.0 and img.max() == 1.0
    assert img[9:15, 9:15, 0].all() and img[:8].sum() == 0 and img[:, :8].sum() == 0


def test_scene_sorted_and_validated():
    a, b = S.Obj("square", "red", 2), S.Obj("circle", "blue", 0)
    assert S.Scene((a, b)) == S.Scene((b, a))
    assert hash(S.Scene((a, b))) == hash(S.Scene((b, a)))
    with pytest.raises(ValueError):
        S.Scene((a, S.Obj("cross", "red", 2)))
    with pytest.raises(ValueError):
        S.Obj("hexagon", "red", 0)


def test_detect_exact_on_clean_render():
    scene = S.Scene(
        (
            S.Obj("square", "red", 0),
            S.Obj("circle", "cyan", 1),
            S.Obj("triangle", "white", 2),
            S.Obj("cross", "purple", 3),
        )
    )
    dets = S.detect(S.render(scene))
    got = sorted((d.shape, d.colour, d.bbox) for d in dets)
    want = sorted((o.shape, o.colour, S.object_bbox(o)) for o in scene.objects)
    assert got == want
    assert all(d.confidence == 1.0 for d in dets)
    assert S.detect(np.zeros((16, 16, 3), np.float32)) == []


# --- generation prompts and judge --------------------------------------------


def test_prompt_counts_and_tags():
    ps = S.all_gen_prompts()
    counts = Counter(p.tag for p in ps)
    n, c = len(S.SHAPES), len(S.COLOURS)
    assert counts == {
        "single_object": n,
        "two_object": n * (n - 1),
        "counting": 3 * n,
        "colors": c * n,
        "position": 4 * n * (n - 1),
        "color_attr": n * (n - 1) * c * (c - 1),
    }
    assert len({p.text for p in ps}) == len(ps)
    assert [p.tag for p in ps] == sorted((p.tag for p in ps), key=S.TAGS.index)
    texts = [p.text for p in ps]
    assert "an orange ring" in texts and "a red ring and an azure tee" in texts
    assert not [t for t in texts if any(f"a {w}" in t for w in ("orange", "azure"))]


@pytest.mark.parametrize("split", ["train", "eval", "calib"])
def test_judge_passes_canonical_scenes(split):
    for p in S.gen_prompts(split):
        assert S.judge(S.render(S.canonical_scene(p)), p), p.text


def test_canonical_positions():
    sc = S.canonical_scene(_prompt("a circle left of a square"))
    assert {(o.shape, o.slot) for o in sc.objects} == {("circle", 0), ("square", 1)}
    sc = S.canonical_scene(_prompt("a circle below a square"))
    assert {(o.shape, o.slot) for o in sc.objects} == {("square", 0), ("circle", 2)}
    sc = S.canonical_scene(_prompt("three crosses"))
    assert [(o.shape, o.colour, o.slot) for o in sc.objects] == [("cross", S.DEFAULT_COLOUR, i) for i in range(3)]


def test_judge_failure_cases():
    # wrong colour
    assert not S.judge(_img(("square", "blue", 0)), _prompt("a red square"))
    assert not S.judge(_img(("square", "red", 0), ("circle", "red", 1)), _prompt("a red square and a blue circle"))
    # missing object
    assert not S.judge(_img(("square", "white", 0)), _prompt("a square and a circle"))
    assert not S.judge(np.zeros((16, 16, 3), np.float32), _prompt("a cross"))
    # counting: too few and too many (N+1 hits the exclude)
    assert not S.judge(_img(*[("circle", "white", i) for i in range(2)]), _prompt("three circles"))
    assert not S.judge(_img(*[("circle", "white", i) for i in range(4)]), _prompt("three circles"))
    assert S.judge(
        _img(*[("circle", "white", i) for i in range(3)], ("square", "red", 3)),
        _prompt("three circles"),
    )
    # swapped positions, and a diagonal that is not "above"
    assert not S.judge(_img(("square", "white", 0), ("circle", "white", 1)), _prompt("a circle left of a square"))
    assert not S.judge(_img(("square", "white", 0), ("circle", "white", 2)), _prompt("a circle above a square"))
    assert S.judge(_img(("square", "white", 3), ("circle", "white", 0)), _prompt("a circle above a square"))
    # wrong shape
    assert not S.judge(_img(("triangle", "white", 0)), _prompt("a square"))
    assert not S.judge(_img(("cross", "red", 0)), _prompt("a red circle"))


def test_judge_tolerates_noise():
    rng = np.random.default_rng(0)
    for p in S.gen_prompts("eval")[::3]:
        clean = S.render(S.canonical_scene(p))
        noisy = clean + rng.normal(0.0, 0.1, clean.shape).astype(np.float32)
        assert S.judge(noisy, p), p.text
        assert S.judge(np.clip(noisy, 0, 1), p), p.text


def test_detect_tolerates_stray_pixels_and_shifts():
    img = _img(("triangle", "green", 0))
    img[7, 3] = (0, 1, 0)  # a pixel stuck to the base widens the box
    img[12, 12] = (1, 1, 1)  # an isolated speck is ignored
    dets = S.detect(img)
    assert [(d.shape, d.colour) for d in dets] == [("triangle", "green")]
    # an object drawn off the slot grid is still found
    img = np.zeros((16, 16, 3), np.float32)
    img[4:10, 5:11][S.TEMPLATES["cross"]] = (1, 1, 0)
    assert [(d.shape, d.colour, d.bbox) for d in S.detect(img)] == [("cross", "yellow", (4.0, 5.0, 10.0, 11.0))]


def test_relations_rule():
    a = (1.0, 1.0, 7.0, 7.0)
    assert S.relations((1.0, 9.0, 7.0, 15.0), a) == {"right of"}
    assert S.relations((9.0, 9.0, 15.0, 15.0), a) == {"right of", "below"}
    assert S.relations(a, (9.0, 1.0, 15.0, 7.0)) == {"above"}
    assert S.relations(a, a) == frozenset()
    # small offsets vanish once the box-size margin is subtracted
    assert S.relations((1.0, 2.0, 7.0, 8.0), a) == frozenset()


def test_splits_disjoint_and_sized():
    """Train, calibration and evaluation prompts are pairwise disjoint in every tag (no calibration
    prompt is an evaluation prompt); only tags too small to spare prompts have no calibration."""
    sets = {sp: {p.text for p in S.gen_prompts(sp)} for sp in S.SPLITS}
    for a, b in itertools.combinations(S.SPLITS, 2):
        assert not sets[a] & sets[b], (a, b, sorted(sets[a] & sets[b])[:5])
    assert set.union(*sets.values()) == {p.text for p in S.all_gen_prompts()}
    for tag in S.TAGS:
        n = sum(p.tag == tag for p in S.all_gen_prompts())
        sizes = {sp: sum(p.tag == tag for p in S.gen_prompts(sp)) for sp in S.SPLITS}
        assert sizes["train"] >= 1 and sizes["eval"] >= 1, (tag, sizes)
        assert (sizes["calib"] == 0) == (n < S.MIN_PROMPTS_FOR_CALIB), (tag, sizes)
    assert {p.tag for p in S.gen_prompts("calib")} >= set(S.TAGS) - {"single_object"}
    ca = [p for p in S.all_gen_prompts() if p.tag == "color_attr"]
    frac = Counter(S.gen_split(p) for p in ca)
    assert abs(frac["train"] / len(ca) - 0.6) < 0.05
    with pytest.raises(ValueError):
        S.gen_prompts("all")


def test_qa_splits_disjoint():
    """ShapesQA items of different splits never share a (scene, question) pair."""
    keys = {sp: {(it.scene, it.question) for it in S.qa_set(sp, 400, seed=0)} for sp in S.SPLITS}
    for a, b in itertools.combinations(S.SPLITS, 2):
        assert not keys[a] & keys[b], (a, b)


def test_geneval_set_deterministic():
    a = S.geneval_set("eval", 2, max_prompts_per_tag=3, seed=1)
    assert a == S.geneval_set("eval", 2, max_prompts_per_tag=3, seed=1)
    assert a != S.geneval_set("eval", 2, max_prompts_per_tag=3, seed=2)
    n_eval = Counter(p.tag for p in S.gen_prompts("eval"))
    assert Counter(p.tag for p, _ in a) == {t: 2 * min(3, n_eval[t]) for t in S.TAGS}
    assert len({s for _, s in a}) == len(a)
    full = S.geneval_set("eval", 1)
    assert [p for p, _ in full] == S.gen_prompts("eval")
    # a prompt's sample seed does not depend on subsetting
    seeds = {p.text: s for p, s in full}
    for p, s in S.geneval_set("eval", 1, max_prompts_per_tag=2):
        assert seeds[p.text] == s


def test_sample_gen_example():
    rng = np.random.default_rng(0)
    train = {p.text for p in S.gen_prompts("train")}
    tags = Counter()
    for _ in range(300):
        p, img = S.sample_gen_example(rng)
        assert p.text in train
        assert S.judge(img, p), p.text
        # the canonical placement; colours the prompt names kept, open ones drawn from COLOURS
        dets = {d.centre: d for d in S.detect(img)}
        ref = {d.centre: d for d in S.detect(S.render(S.canonical_scene(p)))}
        assert {c: d.shape for c, d in dets.items()} == {c: d.shape for c, d in ref.items()}
        for centre, d in dets.items():
            assert d.colour in S.COLOURS
            assert ref[centre].colour in (d.colour, S.DEFAULT_COLOUR)
        tags[p.tag] += 1
    assert set(tags) == set(S.TAGS) and min(tags.values()) > 25


def test_geneval_scores_unweighted():
    ps = {t: next(p for p in S.all_gen_prompts() if p.tag == t) for t in S.TAGS}
    results = [(ps["single_object"], True)] * 9 + [(ps["single_object"], False)]
    results += [(ps[t], False) for t in S.TAGS[1:]]
    sc = S.geneval_scores(results)
    assert sc["single_object"] == pytest.approx(0.9)
    assert sc["overall"] == pytest.approx(0.9 / 6)
    assert sc["n_images"] == 15
    with pytest.raises(ValueError):
        S.geneval_scores(results[:10])


def test_geneval_standard_errors():
    """A tag's error is over prompts (samples of one prompt are not independent); the overall one
    combines the six tags' errors; a tag with one prompt falls back to the binomial error."""
    by_tag = {t: [p for p in S.all_gen_prompts() if p.tag == t] for t in S.TAGS}
    two = by_tag["two_object"][:2]
    results = [(two[0], True)] * 4 + [(two[1], False)] * 4  # prompt means 1 and 0
    results += [(by_tag[t][0], c) for t in S.TAGS if t != "two_object" for c in (True, False)]
    sc = S.geneval_scores(results)
    assert sc["se"]["two_object"] == pytest.approx(np.std([1.0, 0.0], ddof=1) / np.sqrt(2))
    assert sc["se"]["counting"] == pytest.approx(np.sqrt(0.25 / 2))
    assert sc["se"]["overall"] == pytest.approx(np.sqrt(sum(sc["se"][t] ** 2 for t in S.TAGS)) / 6)
    perfect = S.geneval_scores([(by_tag[t][i], True) for t in S.TAGS for i in range(2)])
    assert all(v == 0 for v in perfect["se"].values())


# --- QA --------------------------------------------------------------------


def _answer_from_detections(item):
    """Independent answer: read the rendered image back with detect()."""
    dets = S.detect(S.render(item.scene))
    w = item.question.split()
    if item.qtype == "colour":
        (d,) = [d for d in dets if d.shape == w[-1]]
        return d.colour
    if item.qtype == "shape":
        (d,) = [d for d in dets if d.colour == w[-2]]
        return d.shape
    if item.qtype == "count":
        return S.NUMBERS[sum(S.plural(d.shape) == w[2] for d in dets)]
    (da,) = [d for d in dets if d.shape == w[3]]
    (db,) = [d for d in dets if d.shape == w[-1]]
    (rel,) = S.relations(da.bbox, db.bbox)
    return rel.split()[0]


def test_qa_answers_correct_and_balanced():
    items = S.qa_set("train", 600, seed=0)
    for it in items:
        assert it.answer == _answer_from_detections(it), it
        assert S.qa_split(it.scene, it.question) == "train"
        assert 1 <= len(it.scene.objects) <= 4
        assert all(o.colour in S.COLOURS for o in it.scene.objects)
    qt = Counter(it.qtype for it in items)
    assert set(qt) == set(S.QA_TYPES) and min(qt.values()) > 110
    rel = Counter(it.answer for it in items if it.qtype == "relation")
    assert set(rel) == {"left", "right", "above", "below"} and min(rel.values()) > 0.15 * qt["relation"]
    counts = Counter(it.answer for it in items if it.qtype == "count")
    assert set(counts) == set(S.NUMBERS)


def test_qa_splits_and_determinism():
    ev = S.qa_set("eval", 100, seed=3)
    assert ev == S.qa_set("eval", 100, seed=3)
    assert ev != S.qa_set("eval", 100, seed=4)
    assert all(S.qa_split(i.scene, i.question) == "eval" for i in ev)
    train = {(i.scene, i.question) for i in S.qa_set("train", 200, seed=3)}
    assert not train & {(i.scene, i.question) for i in ev}


def test_qa_scores():
    items = S.qa_set("calib", 40, seed=0)
    res = [(it, it.qtype == "count") for it in items]
    sc = S.qa_scores(res)
    n_count = sum(it.qtype == "count" for it in items)
    assert sc["count"] == 1.0 and sc["colour"] == 0.0
    assert sc["overall"] == pytest.approx(n_count / 40)
    assert sc["n_items"] == 40
    p = n_count / 40
    assert sc["se"]["overall"] == pytest.approx(np.sqrt(p * (1 - p) / 40))
    assert sc["se"]["count"] == 0.0


# --- text ------------------------------------------------------------------


def test_vocab_and_codec():
    assert S.VOCAB[:5] == ("<pad>", "<bos>", "<eos>", "<img>", "</img>")
    assert list(S.VOCAB[5:]) == sorted(S.VOCAB[5:]) and len(set(S.VOCAB)) == len(S.VOCAB)
    texts = [p.text for p in S.all_gen_prompts()] + S.all_questions() + S.all_answers()
    for t in texts:
        assert S.decode(S.encode(t)) == t
    assert S.MAX_PROMPT_WORDS == max(len(p.text.split()) for p in S.all_gen_prompts()) == 7
    assert S.MAX_QUESTION_WORDS == 8
    assert "crosses" in S.VOCAB and "left" in S.VOCAB and "left of" not in S.VOCAB
    assert S.encode("<bos> a square <eos>")[0] == S.BOS_ID
    with pytest.raises(ValueError, match="hexagon"):
        S.encode("a hexagon")
    with pytest.raises(ValueError):
        S.decode([len(S.VOCAB)])


def test_position_rule_divides_by_the_unshrunk_offset():
    """GenEval's relative_position: the shrunk offset is divided by the length of the original one, so
    two large boxes whose centres differ by (4, 4) are in no relation (normalising the shrunk vector
    instead would call it both "right of" and "below")."""
    from unisparse.worlds.shapes import relations

    assert relations((4, 4, 19, 19), (0, 0, 15, 15)) == frozenset()
    assert relations((0, 20, 4, 24), (0, 0, 4, 4)) == frozenset({"right of"})
    assert relations((20, 0, 24, 4), (0, 0, 4, 4)) == frozenset({"below"})
