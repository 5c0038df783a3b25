# unisparse: reproduce "Understanding and Harnessing Sparsity in Unified Multimodal Models".
# Thin on purpose: configuration, validation and the rule files; all logic lives in src/unisparse.
from snakemake.utils import min_version

min_version("9.0")


# the tiny default unless --configfile names another config (which then replaces it, not merges)
if not workflow.overwrite_configfiles:

    configfile: "workflow/config/tiny.yaml"


report: "workflow/report/workflow.rst"


include: "rules/common.smk"
include: "rules/resources.smk"
include: "rules/inputs.smk"
include: "rules/checkpoint.smk"
include: "rules/evaluate.smk"
include: "rules/calibrate.smk"
include: "rules/depth.smk"
include: "rules/width.smk"
include: "rules/tunedata.smk"
include: "rules/moe.smk"
include: "rules/tables.smk"
include: "rules/figure_targets.smk"
include: "rules/figures.smk"


rule all:
    input:
        all_targets(),
    default_target: True
