"""Tuning data for the MoE stages on real text-to-image data: read a source (WebDataset tars, BAGEL's
T2I parquet, captions whose images the dense model samples), check it against the evaluation prompts,
encode every image once through the family's own codec and tokenise its caption (``prepare``), then
read the prepared latents in a seeded, resumable order while tuning (``latents``).

The embedded default (``shapes``) has no such stage: its tuning draws the shapes world on the fly.
"""
