"""ShapesQA: one-token answers scored by exact match, per question type and overall."""
from __future__ import annotations

import torch

from .. import tasks
from ..families import family_for
from ..worlds import shapes


@torch.no_grad()
def answer_questions(family, items, batch_size: int = 256) -> list[str]:
    """The greedy one-token answer to each item, decoded with the model's tokenizer."""
    family = family_for(family)
    answers = []
    for i in range(0, len(items), batch_size):
        images, questions, _ = tasks.qa_batch(items[i : i + batch_size], family.encode)
        logits = family.understanding_logits(images, questions)
        answers += [family.tokenizer.decode([j]) for j in logits.argmax(-1).tolist()]
    return answers


def evaluate_understanding(family, items, batch_size: int = 256) -> dict:
    predicted = answer_questions(family, items, batch_size)
    return shapes.qa_scores([(it, p == it.answer) for it, p in zip(items, predicted)])
