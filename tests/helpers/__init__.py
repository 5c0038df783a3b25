"""Helpers shared by the test modules (no test module imports another; fixtures live in conftest.py).

- ``workflow``: copies of the workflow or the working tree, the one Snakemake runner, dry-run job
  counts, the stand-in ``unisparse`` command, DVC's environment and the ``needs_dvc`` skip.
- ``cli``: the CLI in-process (``cli``, ``run_cli``) and ``refused``.
- ``models``: ``make_model``, the micro model of the verb tests, saved models and calibrations.
- ``verb_chain``: every CLI verb on one micro checkpoint, on a given device and dtype.
- ``hub``: the fake Hugging Face repository and cache of the checkpoint download tests.
- ``benchmarks``: tiny GenEval models and MME / POPE datasets in a Hugging Face cache.
- ``qwen_image``: a tiny random Qwen-Image pipeline in the real snapshot's layout.
"""
