"""ShapesGenEval: sample images for GenEval-style prompts with fixed seeds and judge them."""

from __future__ import annotations

import torch
from tqdm import tqdm

from ..families import require_family
from ..worlds import shapes


@torch.no_grad()
def generate_for(family, pairs, sampler: dict, batch_size: int = 128, progress: bool = False):
    """Images for (prompt, seed) pairs, in order; [N, H, W, 3] float in [0, 1]. ``sampler``: the
    settings of ``generate_images`` (``models.sampling.SAMPLER_DEFAULTS``)."""
    require_family(family, "generate_for")
    out = []
    for i in tqdm(range(0, len(pairs), batch_size), desc="generate", disable=not progress):
        chunk = pairs[i : i + batch_size]
        ids = [family.encode(p.text) for p, _ in chunk]
        images = family.generate_images(ids, [s for _, s in chunk], **sampler)
        out.append(images.float().cpu())
    return torch.cat(out)


def evaluate_generation(family, pairs, sampler: dict, batch_size: int = 128, progress: bool = False) -> dict:
    images = generate_for(family, pairs, sampler, batch_size, progress).numpy()
    results = [(p, shapes.judge(img, p)) for (p, _), img in zip(pairs, images)]
    return shapes.geneval_scores(results)
