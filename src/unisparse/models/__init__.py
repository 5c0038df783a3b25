"""Modeling files, one per model (transformers' style): import what you use from its module, e.g.
``models.modeling_mot.MoTForUnifiedModel``, ``models.blocks.SwiGLUMLP``, ``models.moe_block.MoEMLP``.
Importing this package loads none of them, so the blocks and the sampler settings the algorithms use
come without the MoT's modeling file."""
