# unisparse: reproduce "Understanding and Harnessing Sparsity in Unified Multimodal Models".
# Thin on purpose: configuration, validation and the rule files; all logic lives in src/unisparse.
from snakemake.utils import min_version

min_version("9.0")


configfile: "workflow/config/tiny.yaml"


include: "rules/common.smk"
include: "rules/checkpoint.smk"
include: "rules/evaluate.smk"


rule all:
    input:
        all_targets(),
    default_target: True
