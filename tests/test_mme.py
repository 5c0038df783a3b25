"""MME (unisparse.evaluate.mme): MME's answer parsing and scoring on hand-built answers, the image
transform, and, offline, the whole runner on a tiny BAGEL-layout MoT reading a tiny MME-like dataset
(and a POPE-like calibration set) from a temporary Hugging Face cache in the Hub's real layout."""

import numpy as np
import pytest
import torch

from helpers.benchmarks import (
    COCO_IN_MME,
    COMMIT_MME,
    COMMIT_POPE,
    MME_SUBTASKS,
    POPE_COLUMNS,
    mme_files,
    mme_rows,
    parquet_bytes,
    pope_rows,
    write_dataset,
)
from unisparse.evaluate import mme


# ------------------------------------------------------------------------------------------ parsing
@pytest.mark.parametrize(
    "response, label",
    [
        ("Yes.", "yes"),
        ("yes", "yes"),
        ("Yes", "yes"),
        ("No", "no"),
        ("no", "no"),
        ("No.", "no"),
        ("Yes, it is", "yes"),
        ("maybe", "other"),
        ("", "other"),
        ("y", "other"),
        ("not sure", "no"),  # the official rule looks at the first four characters: "not " holds "no"
        ("The answer is yes", "other"),  # ... and only at them
        ("   yes", "other"),
        (" yes", "yes"),
        ("\nYes", "yes"),  # BAGEL drops newlines first
        ("True", "yes"),
        ("false", "no"),  # BAGEL: true -> yes, false -> no
        ("是", "yes"),
        ("不是", "no"),
        ("否", "no"),  # BAGEL's Chinese mapping
    ],
)
def test_answer_label(response, label):
    assert mme.answer_label(response) == label


def test_parse_answer_is_the_official_rule():
    assert mme.parse_answer("yes") == "yes" and mme.parse_answer("NO") == "no"
    assert mme.parse_answer("nope") == "no" and mme.parse_answer("yesno") == "yes"
    assert mme.parse_answer("a no") == "no" and mme.parse_answer("ayes") == "yes"  # inside [:4]
    assert mme.parse_answer("a yes") == "other"  # "a ye" is all it reads
    assert mme.parse_answer("abcdno") == "other"


def test_prompt_is_bagels():
    q = "Is there a train in this image? Please answer yes or no."
    assert mme.mme_prompt(q + "\n") == q + " Answer the question using a single word or phrase."
    assert mme.calibration_prompt("Is there a dog in the image?") == (
        "Is there a dog in the image? Please answer yes or no. Answer the question using a single word or phrase."
    )
    assert mme.calibration_prompt(q) == mme.mme_prompt(q)


# ------------------------------------------------------------------------------------------ scoring
def rec(category, image, answer, pred):
    return {"category": category, "question_id": image, "answer": answer, "pred": pred}


def test_scores_by_hand():
    records = [
        rec("existence", "e1", "Yes", "yes"),
        rec("existence", "e1", "No", "no"),  # both right
        rec("existence", "e2", "Yes", "yes"),
        rec("existence", "e2", "No", "yes"),  # one right
        rec("existence", "e3", "yes", "other"),
        rec("existence", "e3", "no", "yes"),  # none (other = wrong)
        rec("code_reasoning", "c1", "Yes", "yes"),
        rec("code_reasoning", "c1", "No", "no"),
    ]
    s = mme.mme_scores(records)
    ex = s["per_subtask"]["existence"]
    assert ex["acc"] == pytest.approx(3 / 6) and ex["acc_plus"] == pytest.approx(1 / 3)
    assert ex["score"] == pytest.approx(100 * (0.5 + 1 / 3))
    assert (ex["n"], ex["n_images"], ex["n_other"], ex["category"]) == (6, 3, 1, "perception")
    cr = s["per_subtask"]["code_reasoning"]
    assert (cr["acc"], cr["acc_plus"], cr["score"], cr["n"]) == (1.0, 1.0, 200.0, 2)
    assert s["perception"] == pytest.approx(ex["score"])
    assert s["cognition"] == pytest.approx(200.0)
    assert s["total"] == pytest.approx(ex["score"] + 200.0)
    assert s["n_items"] == 8
    assert s["missing_subtasks"] == [n for n in mme.SUBTASKS if n not in ("existence", "code_reasoning")]
    # standard errors: binomial on acc, per image on acc+ and on the score (z = 100 (k/2 + [k == 2]))
    se = s["se"]["per_subtask"]["existence"]
    assert se["acc"] == pytest.approx(np.sqrt(0.5 * 0.5 / 6))
    assert se["acc_plus"] == pytest.approx(np.sqrt((1 / 3) * (2 / 3) / 3))
    z = np.array([200.0, 50.0, 0.0])
    assert se["score"] == pytest.approx(z.std() / np.sqrt(3))
    assert s["se"]["per_subtask"]["code_reasoning"]["score"] == 0.0
    assert s["se"]["perception"] == pytest.approx(se["score"])
    assert s["se"]["total"] == pytest.approx(np.hypot(se["score"], 0.0))


def test_full_marks_and_category_sums():
    records = [rec(t, f"{t}/{i}", a, a.lower()) for t in mme.SUBTASKS for i in range(3) for a in ("Yes", "No")]
    s = mme.mme_scores(records)
    assert s["perception"] == 2000.0 and s["cognition"] == 800.0 and s["total"] == 2800.0
    assert s["missing_subtasks"] == [] and list(s["per_subtask"]) == list(mme.SUBTASKS)
    assert len(mme.PERCEPTION) == 10 and len(mme.COGNITION) == 4
    # all "other": zero everywhere
    s0 = mme.mme_scores([{**r, "pred": "other"} for r in records])
    assert s0["total"] == 0.0 and all(p["n_other"] == 6 for p in s0["per_subtask"].values())


def test_scoring_refuses_malformed_results():
    with pytest.raises(ValueError, match="2 questions"):
        mme.mme_scores([rec("count", "i", "Yes", "yes")])
    with pytest.raises(ValueError, match="unknown MME subtask"):
        mme.mme_scores([rec("Count", "i", "Yes", "yes"), rec("Count", "i", "No", "no")])
    with pytest.raises(ValueError, match="prediction"):
        mme.mme_scores([rec("count", "i", "Yes", "Yes."), rec("count", "i", "No", "no")])
    with pytest.raises(ValueError, match="yes or no"):
        mme.mme_scores([rec("count", "i", "maybe", "yes"), rec("count", "i", "No", "no")])
    with pytest.raises(ValueError, match="no MME results"):
        mme.mme_scores([])


# ------------------------------------------------------------------------------------------ images
def test_bagel_resize_shape():
    assert mme.bagel_resize_shape(640, 480) == (644, 476)  # no upscaling; multiples of 14
    assert mme.bagel_resize_shape(2000, 1000) == (980, 490)  # long side 980
    assert mme.bagel_resize_shape(100, 50) == (756, 378)  # short side 378


class Cfg:
    def __init__(self, size, patch, vision="patch", max_side=None):
        self.vit_image_size, self.vit_patch_size, self.vision = size, patch, vision
        self.vit_max_num_patch_per_side = max_side or size // patch


def test_navit_resize_is_bagels_resolution():
    from PIL import Image

    bagel_cfg = Cfg(980, 14, "siglip_navit", 70)
    out = mme.navit_resize(Image.new("RGB", (640, 480), (0, 0, 255)), bagel_cfg)
    assert out.shape == (476, 644, 3) and out.dtype == np.float32
    assert np.allclose(out[..., 2], 1.0) and np.allclose(out[..., :2], 0.0)
    assert mme.bagel_transform(Image.new("L", (100, 50), 3), bagel_cfg).shape == (378, 756, 3)
    assert mme.bagel_transform(Image.new("RGB", (2000, 1000)), bagel_cfg).shape == (490, 980, 3)
    # capped by vit_image_size (and the position table), sides on the patch grid
    small = mme.navit_resize(Image.new("RGB", (40, 30)), Cfg(28, 14, "siglip_navit", 70))
    assert small.shape == (14, 28, 3)
    assert mme.navit_resize(Image.new("RGB", (3000, 2000)), Cfg(980, 14, "siglip_navit", 20)).shape[1] == 280
    # the fixed-size patch encoder gets the letterbox
    assert mme.bagel_transform(Image.new("RGB", (40, 30)), Cfg(28, 14)).shape == (28, 28, 3)


def test_letterbox_keeps_aspect_and_pads_grey():
    from PIL import Image

    out = mme.letterbox(Image.new("RGB", (60, 30), (255, 0, 0)), Cfg(28, 14))
    assert out.shape == (28, 28, 3) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    content = np.abs(out - mme.PAD_VALUE).max(-1) > 0.1
    rows, cols = np.nonzero(content.any(1))[0], np.nonzero(content.any(0))[0]
    assert len(cols) == 28 and len(rows) == 14  # 2:1 kept
    assert rows[0] % 14 == 0  # on the patch grid
    tall = mme.letterbox(Image.new("L", (20, 80), 0), Cfg(56, 14))  # grey-scale input, tall image
    content = np.abs(tall - mme.PAD_VALUE).max(-1) > 0.1
    assert content.any(0).sum() == 14 and content.any(1).sum() == 56
    # at BAGEL's size the content is BAGEL's resize of the image, unscaled
    big = mme.letterbox(Image.new("RGB", (640, 480), (0, 0, 255)), Cfg(980, 14))
    content = np.abs(big - mme.PAD_VALUE).max(-1) > 0.1
    assert (content.any(0).sum(), content.any(1).sum()) == (644, 476)


# ------------------------------------------------------------------------------------------ a fake Hub cache
@pytest.fixture
def hf_cache(tmp_path, offline, monkeypatch):
    """A temporary Hugging Face cache holding the tiny MME and POPE, HF_HUB_CACHE pointed at it."""
    import huggingface_hub.constants

    cache = tmp_path / "hf" / "hub"
    write_dataset(cache, "lmms-lab/MME", COMMIT_MME, mme_files(mme_rows()))
    rows = pope_rows()
    third = len(rows) // 3
    write_dataset(
        cache,
        "lmms-lab/POPE",
        COMMIT_POPE,
        {
            f"data/test-0000{i}-of-00003.parquet": parquet_bytes(rows[i * third : (i + 1) * third], POPE_COLUMNS)
            for i in range(3)
        },
    )
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def tiny_bagel(tmp_path_factory):
    from unisparse.models import bagel
    from unisparse.text import tokenizer_for

    d = tmp_path_factory.mktemp("bagel")
    bagel.write_fake_checkpoint(d)
    model = bagel.load_bagel(d, dtype=torch.float32, image_size=64, vit_image_size=28)
    return model, tokenizer_for(d)


# ------------------------------------------------------------------------------------------ data
def test_load_mme_from_the_cache(hf_cache):
    items = mme.load_mme()
    assert len(items) == 16
    assert [it.category for it in items[::2]] == [t for t in mme.SUBTASKS if t in MME_SUBTASKS for _ in range(2)]
    for a, b in zip(items[::2], items[1::2]):  # an image's two questions are adjacent
        assert a.image_key == b.image_key and {a.answer, b.answer} == {"yes", "no"}
    img = items[0].image()
    assert img.size in {(40, 30), (20, 50), (33, 33), (64, 16)}
    # deterministic, nested subsample of whole images
    one, two = mme.load_mme(max_images_per_subtask=1), mme.load_mme(max_images_per_subtask=2)
    assert len(one) == 8 and len({it.image_key for it in one}) == 4
    assert {it.image_key for it in one} <= {it.image_key for it in two}
    assert [it.question for it in mme.load_mme(max_images_per_subtask=1)] == [it.question for it in one]
    # by commit, too
    assert len(mme.load_mme(revision=COMMIT_MME)) == 16


def test_missing_dataset_names_repo_and_cache(hf_cache):
    with pytest.raises(FileNotFoundError) as e:
        mme.load_mme("someone/not-cached")
    assert "someone/not-cached" in str(e.value) and str(hf_cache) in str(e.value)
    with pytest.raises(FileNotFoundError, match="lmms-lab/MME"):
        mme.load_mme(revision="0" * 40)


def test_incomplete_shards_refused(tmp_path, offline):
    cache = tmp_path / "hub"
    files = mme_files(mme_rows())
    del files["data/test-00001-of-00002-7d22c7f1aba6fca4.parquet"]
    write_dataset(cache, "lmms-lab/MME", COMMIT_MME, files)
    with pytest.raises(ValueError, match="incomplete or duplicated"):
        mme.load_mme(cache_dir=cache)


# ------------------------------------------------------------------------------------------ end to end
def test_run_mme_end_to_end(hf_cache, tiny_bagel):
    model, tok = tiny_bagel
    spec = {"batch_size": 5, "qa_items": 3}  # keys of other stages are ignored
    out = mme.run_mme(model, tok, spec)
    assert set(out) >= {"total", "perception", "cognition", "per_subtask", "se", "per_item", "n_items", "data"}
    assert list(out["per_subtask"]) == [t for t in mme.SUBTASKS if t in MME_SUBTASKS]
    for name, p in out["per_subtask"].items():
        assert set(p) >= {"acc", "acc_plus", "score", "n"} and p["n"] == 4 and p["n_images"] == 2
        assert 0.0 <= p["score"] <= 200.0
        assert p["category"] == mme.CATEGORY_OF[name]
    assert out["total"] == pytest.approx(out["perception"] + out["cognition"])
    assert set(out["se"]) == {"total", "perception", "cognition", "per_subtask"}
    assert len(out["per_item"]) == out["n_items"] == 16
    for r in out["per_item"]:
        assert isinstance(r["response"], str) and r["pred"] in mme.LABELS
        assert r["pred"] == mme.answer_label(r["response"]) and r["correct"] == (r["pred"] == r["answer"])
        assert 0 <= r["token_id"] < model.config.vocab_size
    assert out["data"]["commit"] == COMMIT_MME and out["data"]["repo_id"] == "lmms-lab/MME"
    assert out["data"]["files"] == sorted(f for f in mme_files([]) if f.endswith(".parquet"))
    # batching does not change the answers
    again = mme.run_mme(model, tok, {"batch_size": 16})
    assert [r["token_id"] for r in again["per_item"]] == [r["token_id"] for r in out["per_item"]]
    # subsample
    small = mme.run_mme(model, tok, {"mme_max_images_per_subtask": 1, "batch_size": 8})
    assert small["n_items"] == 8 and all(p["n_images"] == 1 for p in small["per_subtask"].values())


class AnsweringTokenizer:
    """A byte tokenizer with two extra whole-word tokens, "Yes" and "No" (as Qwen2's vocabulary has)."""

    YES, NO = 1000, 1001

    def __init__(self, inner):
        self.inner, self.name = inner, "answering"

    def encode(self, text):
        return self.inner.encode(text)

    def decode(self, ids):
        return {self.YES: "Yes", self.NO: "No"}.get(int(ids[0]), None) or self.inner.decode(ids)


class ScriptedModel:
    """Answers by subtask: existence right, OCR always "No", code_reasoning always wrong, text_translation
    always "maybe"-like (a byte token), so the scores are known."""

    def __init__(self, tokenizer, size=28):
        self.tok, self.config, self.calls = tokenizer, Cfg(size, 14), []

    def eval(self):
        return self

    @property
    def image_config(self):  # what a family adapter says about its understanding images
        return self.config

    def understanding_logits(self, images, question_ids):
        assert images.dtype == torch.float32 and images.shape[1:] == (28, 28, 3)
        self.calls.append(len(question_ids))
        logits = torch.zeros(len(question_ids), 1002)
        for b, ids in enumerate(question_ids):
            q = self.tok.decode(ids)
            assert q.endswith("Please answer yes or no. " + mme.BAGEL_SUFFIX)
            truth = "yes" if " yes?" in q else "no"
            if q.startswith("Is this existence"):
                pick = self.YES if truth == "yes" else self.NO
            elif q.startswith("Is this OCR"):
                pick = self.NO
            elif q.startswith("Is this code_reasoning"):
                pick = self.NO if truth == "yes" else self.YES
            else:
                pick = self.tok.encode("m")[0]  # a byte token: "m" -> other
            logits[b, pick] = 1.0
        return logits

    YES, NO = AnsweringTokenizer.YES, AnsweringTokenizer.NO


def test_run_mme_scores_known_answers(hf_cache, tiny_bagel):
    _, byte_tok = tiny_bagel
    tok = AnsweringTokenizer(byte_tok)
    model = ScriptedModel(tok)
    out = mme.run_mme(model, tok, {"batch_size": 6})
    assert model.calls == [6, 6, 4]
    per = out["per_subtask"]
    assert per["existence"]["score"] == 200.0
    assert (per["OCR"]["acc"], per["OCR"]["acc_plus"], per["OCR"]["score"]) == (0.5, 0.0, 50.0)
    assert per["code_reasoning"]["score"] == 0.0 and per["code_reasoning"]["n_other"] == 0
    assert per["text_translation"]["score"] == 0.0 and per["text_translation"]["n_other"] == 4
    assert (out["perception"], out["cognition"], out["total"]) == (250.0, 0.0, 250.0)
    assert {r["response"] for r in out["per_item"]} == {"Yes", "No", "m"}
    assert out["se"]["per_subtask"]["OCR"]["score"] == 0.0  # every OCR image scored 50
    assert out["se"]["per_subtask"]["OCR"]["acc"] == pytest.approx(0.25)  # sqrt(.5 * .5 / 4)


def test_run_mme_settings_checked(hf_cache, tiny_bagel):
    model, tok = tiny_bagel
    with pytest.raises(ValueError, match="batch_size"):
        mme.run_mme(model, tok, {"batch_size": "8"})
    from unisparse.text import ShapesTokenizer

    with pytest.raises(ValueError, match="text tokenizer"):
        mme.run_mme(model, ShapesTokenizer(), {})


def test_calibration_items(hf_cache, tiny_bagel):
    from PIL import Image

    items = mme.calibration_items({"calib_items": 6, "batch_size": 3})
    assert len(items) == 6
    for image, prompt in items:
        assert isinstance(image, Image.Image)
        assert prompt.endswith("Please answer yes or no. " + mme.BAGEL_SUFFIX)
    # MME's COCO image is excluded; three images remain, one question each per round
    items_all, info = mme.calibration_set({"calib_items": 100})
    assert info["excluded_mme_images"] == [f"COCO_val2014_{COCO_IN_MME}"]
    assert info["commit"] == COMMIT_POPE and info["images"] == 3
    # distinct (image, question): "dog" once per image, plus 3 settings' "cat" questions = 4 per image
    assert len(items_all) == 12 and len({p for _, p in items_all}) == 4
    first_round = {im.tobytes() for im, _ in items_all[:3]}
    assert len(first_round) == 3  # the first round visits every image once
    # deterministic and nested
    assert [p for _, p in mme.calibration_items({"calib_items": 6})] == [p for _, p in items]
    assert [p for _, p in items_all[:6]] == [p for _, p in items]
    # without the exclusion the shared image comes back
    _, info = mme.calibration_set({"calib_items": 100, "calib_exclude_mme_images": False})
    assert info["images"] == 4 and info["excluded_mme_images"] == []
    # they stream through the model's understanding prefill
    model, tok = tiny_bagel
    images, ids = mme.prepare_batch([im for im, _ in items], [p for _, p in items], tok, model.config)
    assert isinstance(images, list) and len(images) == 6  # NaViT: each image at its own size
    assert {tuple(im.shape) for im in images} <= {(28, 28, 3), (14, 28, 3), (28, 14, 3)}
    assert all(im.dtype == torch.float32 for im in images)
    logits = model.understanding_logits(images, ids)
    assert logits.shape == (6, model.config.vocab_size) and torch.isfinite(logits).all()


def test_calibration_needs_mme_for_the_exclusion(tmp_path, offline):
    cache = tmp_path / "hub"
    rows = pope_rows()
    write_dataset(
        cache, "lmms-lab/POPE", COMMIT_POPE, {"data/test-00000-of-00001.parquet": parquet_bytes(rows, POPE_COLUMNS)}
    )
    with pytest.raises(FileNotFoundError, match="calib_exclude_mme_images"):
        mme.calibration_items({"hf_cache_dir": str(cache)})
    items = mme.calibration_items({"hf_cache_dir": str(cache), "calib_exclude_mme_images": False, "calib_items": 4})
    assert len(items) == 4
