"""ShapesGenEval: sample images for GenEval-style prompts with fixed seeds and judge them."""
from __future__ import annotations

import torch
from tqdm import tqdm

from ..worlds import shapes


@torch.no_grad()
def generate_for(model, pairs, num_steps: int, cfg_scale: float, batch_size: int = 128, progress: bool = False):
    """Images for (prompt, seed) pairs, in order; [N, H, W, 3] float in [0, 1]."""
    out = []
    for i in tqdm(range(0, len(pairs), batch_size), desc="generate", disable=not progress):
        chunk = pairs[i : i + batch_size]
        ids = [shapes.encode(p.text) for p, _ in chunk]
        images = model.generate_images(ids, [s for _, s in chunk], num_steps=num_steps, cfg_scale=cfg_scale)
        out.append(images.float().cpu())
    return torch.cat(out)


def evaluate_generation(model, pairs, num_steps: int, cfg_scale: float, batch_size: int = 128, progress: bool = False) -> dict:
    images = generate_for(model, pairs, num_steps, cfg_scale, batch_size, progress).numpy()
    results = [(p, shapes.judge(img, p)) for (p, _), img in zip(pairs, images)]
    return shapes.geneval_scores(results)
