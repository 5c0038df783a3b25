"""ShapesQA: one-token answers scored by exact match, per question type and overall."""

from __future__ import annotations

import torch

from .. import tasks
from ..families import require_family
from ..worlds import shapes


@torch.no_grad()
def answer_ids(family, items, batch_size: int = 256) -> list[int]:
    """The greedy next token after each item's image and question."""
    require_family(family, "answer_ids")
    out = []
    for i in range(0, len(items), batch_size):
        images, questions, _ = tasks.qa_batch(items[i : i + batch_size], family.encode)
        out += family.understanding_logits(images, questions).argmax(-1).tolist()
    return out


def answer_questions(family, items, batch_size: int = 256) -> list[str]:
    """The greedy one-token answer to each item, decoded with the model's tokenizer."""
    return [family.tokenizer.decode([j]) for j in answer_ids(family, items, batch_size)]


def evaluate_understanding(family, items, batch_size: int = 256) -> dict:
    """Accuracy of the greedy token against the answer's first token (what training teaches, as
    ``tasks.qa_batch`` gives it): one word of the shapes vocabulary, and the same rule for a tokenizer
    that splits an answer word into several tokens."""
    predicted = answer_ids(family, items, batch_size)
    return shapes.qa_scores([(it, p == family.encode(it.answer)[0]) for it, p in zip(items, predicted)])
