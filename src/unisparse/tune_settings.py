"""MoE tuning's settings and their defaults (config ``moe.tune.<mode>``, ``tune-moe --spec``), kept
free of torch so that the DAG's memory plan (``memplan``) reads the same defaults the loop uses.

``master_dtype``: the dtype trainable parameters are kept and updated in (``float32``; ``model``:
the model's own, pure bf16 AdamW); ``activation_checkpointing``: recompute each decoder layer's
activations in backward instead of keeping them.
"""

TUNE_DEFAULTS = dict(
    steps=400,
    batch_gen=32,
    lr=1e-3,
    weight_decay=0.0,
    warmup_frac=0.05,
    min_lr_frac=0.1,
    cond_dropout=0.1,
    grad_clip=1.0,
    balance_coef=0.0,
    checkpoint_every=100,
    seed=0,
    threads=2,
    objective="flow",
    latent="sample",
    master_dtype="float32",
    activation_checkpointing=False,
)
