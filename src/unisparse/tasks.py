"""Turn shapes-world examples into model inputs for the two tasks (understanding, generation).

Kept apart from the model (which is world-agnostic) and from the world (which is numpy-only). Text
becomes token ids through the model's own tokenizer (``encode``; the family adapter's), so every
family runs the same world.
"""

from __future__ import annotations

import numpy as np
import torch

from .worlds import shapes


def qa_batch(items, encode=shapes.encode):
    """Images [B,H,W,3], question token ids, answer ids for a list of ``QAItem``."""
    images = torch.from_numpy(np.stack([shapes.render(it.scene) for it in items]))
    questions = [encode(it.question) for it in items]
    answers = torch.tensor([encode(it.answer)[0] for it in items], dtype=torch.long)
    return images, questions, answers


def gen_batch(examples, encode=shapes.encode):
    """Prompt token ids and target images for a list of (``GenPrompt``, image) examples."""
    ids = [encode(p.text) for p, _ in examples]
    images = torch.from_numpy(np.stack([image for _, image in examples]))
    return ids, images


def model_config_kwargs() -> dict:
    """The world-determined part of the model config: vocabulary and image geometry."""
    v = shapes.VOCAB
    return dict(
        vocab_size=len(v),
        pad_token_id=v.index("<pad>"),
        bos_token_id=v.index("<bos>"),
        eos_token_id=v.index("<eos>"),
        image_start_token_id=v.index("<img>"),
        image_end_token_id=v.index("</img>"),
        image_size=shapes.CANVAS,
        num_channels=3,
    )


def gen_batch_loss(family, examples, cond_dropout: float, gen, world, observer=None):
    """Flow loss on this process's slice of a global generation batch of (prompt, image) examples
    (``family``: the model's adapter). Dropout mask, noise and t are drawn for the whole batch from the
    CPU generator (in that order), then sliced."""
    ids, images = gen_batch(examples, family.encode)
    n = len(examples)
    keep = torch.rand(n, generator=gen) >= cond_dropout
    noise = torch.randn(*family.noise_shape(n), generator=gen)
    t = torch.sigmoid(torch.randn(n, generator=gen))
    mine = world.slice(n)
    return family.flow_loss(
        ids[mine], images[mine], cond_keep=keep[mine], noise=noise[mine], t=t[mine], observer=observer
    )
