"""The shapes world's text: a whitespace vocabulary of every word its prompts, questions and answers
use (after the special tokens), and ``encode`` / ``decode``."""

from __future__ import annotations

from typing import Iterable

from .prompts import all_gen_prompts
from .qa import all_answers, all_questions

SPECIALS = ("<pad>", "<bos>", "<eos>", "<img>", "</img>")
PAD_ID, BOS_ID, EOS_ID, IMG_ID, IMG_END_ID = range(len(SPECIALS))


def _build_vocab() -> tuple:
    words = set()
    for text in [p.text for p in all_gen_prompts()] + all_questions() + all_answers():
        words.update(text.split())
    return SPECIALS + tuple(sorted(words - set(SPECIALS)))


VOCAB = _build_vocab()
_WORD_ID = {w: i for i, w in enumerate(VOCAB)}
MAX_PROMPT_WORDS = max(len(p.text.split()) for p in all_gen_prompts())
MAX_QUESTION_WORDS = max(len(q.split()) for q in all_questions())


def encode(text: str) -> list:
    """Whitespace-tokenise into vocabulary ids (no <bos>/<eos> are added)."""
    ids = []
    for word in text.split():
        if word not in _WORD_ID:
            raise ValueError(f"unknown word {word!r} in {text!r}")
        ids.append(_WORD_ID[word])
    return ids


def decode(ids: Iterable[int]) -> str:
    """Ids back to space-joined words (specials included, nothing stripped)."""
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < len(VOCAB)]
    if bad:
        raise ValueError(f"ids out of vocabulary range: {bad}")
    return " ".join(VOCAB[i] for i in ids)
