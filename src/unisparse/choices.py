"""The allowed values of every choice the pipeline exposes, each defined once.

The library checks its arguments against these tuples, the CLI offers them as ``choices``, the
config schema takes its enums from them (``config_checks.config_schema`` fills each
``{choices: NAME}`` of workflow/schemas/config.schema.yaml) and the rules build their
wildcard_constraints from them (rules/common.smk ``one_of``). Pure Python without imports: Snakemake
imports this module when it builds the DAG. Order matters where noted (the first is the default,
or values are indexed by position).
"""

from __future__ import annotations

# --- model structure
#: the towers of a Mixture-of-Transformers model: understanding and generation
COMPONENTS = ("und", "gen")
#: the sublayers of a decoder layer
SUBLAYERS = ("attn", "mlp")

# --- calibration and evaluation
#: the tasks a model is calibrated and evaluated on (named like the components they exercise)
TASKS = ("und", "gen")
#: per task, the benchmarks a setting may name; the first is the default
BENCHMARKS = {"gen": ("shapes_geneval", "geneval"), "und": ("shapesqa", "mme")}
#: GenEval's prompt sets: the original 553 prompts (short) or the rewritten long ones the paper uses
GENEVAL_PROMPT_SETS = ("short", "long")
#: classifier-free guidance renormalisation of the sampler (BAGEL's global / per-token rescale, clamped at 1;
#: ``pipeline``: QwenImagePipeline's own unclamped per-token rescale, Qwen-Image family only)
CFG_RENORM_TYPES = ("none", "global", "channel", "pipeline")
#: the renormalisations of BAGEL's (the MoT's) sampler
MOT_RENORMS = tuple(r for r in CFG_RENORM_TYPES if r != "pipeline")
#: ShapesQA question types, in the order of train.qa_weights
QA_TYPES = ("colour", "shape", "count", "relation")

# --- depth pruning
#: what depth pruning drops: blocks, attention or MLP sublayers, or both kinds ranked together
GRANULARITIES = ("block", "attn", "mlp", "sublayer")
#: definitions of the cosine score that ranks layers: LLM-Drop's, or as published for BAGEL
DEPTH_SCORES = ("ld", "bagel")
#: attention keys/values of a dropped attention sublayer: still computed for later layers, or none
SKIPPED_ATTENTION_KV = ("keep", "none")
#: drop the n best-ranked sublayers at once, or one at a time with recalibration in between
DEPTH_MODES = ("oneshot", "iterative")

# --- width pruning
#: neuron importance scores that rank the MLP neurons to keep
WIDTH_SCORES = ("act_norm", "weight", "published", "random")
#: the width scores that need no calibration statistics
DATA_FREE_WIDTH_SCORES = ("weight", "random")

# --- MoE adaptation
#: how a dense MLP's neurons are split into experts
PARTITION_METHODS = ("snake", "contiguous", "random", "cluster")
#: router of an MoE block: the paper's (top-k of raw logits, output scaled by 1 + logit) or softmax
ROUTERS = ("paper", "softmax")
#: implementations of an MoE block's expert dispatch (same result, different speed)
DISPATCHES = ("auto", "dense_equivalent", "nosync", "grouped", "grouped_mm", "triton", "loop")
#: MoE tuning: routers only (frozen experts) or routers and experts
TUNING_MODES = ("frozen", "full")
#: the tunings of an MoE variant in the pipeline: the untuned partition, then the tuning modes
TUNINGS = ("none",) + TUNING_MODES
#: what the full tuning starts from: the untuned partition or the router-tuned model
FULL_INITS = ("none", "frozen")
#: named sets of layers an MoE conversion keeps dense (else a list of layer indices)
DENSE_LAYER_PRESETS = ("first_last", "none")
#: models given the MoE's full tuning as controls: the dense model, the static width cut at k/E
MOE_CONTROLS = ("dense", "static")
#: where tuning data comes from: the shapes world (the embedded default, drawn on the fly), WebDataset
#: tars, BAGEL's T2I parquet, or captions only whose images the dense model samples (``teacher``)
TUNE_DATA_SOURCES = ("shapes", "webdataset", "bagel_parquet", "teacher")
#: the outside inputs a study reads from the Hugging Face cache, each pinned by a lock (``hub.inputs``):
#: GenEval's detector and CLIP, MME, and the understanding calibration set (unisparse.hub_inputs)
HUB_INPUT_ROLES = ("detector", "clip", "mme", "calib")
#: what tuning minimises: the rectified-flow loss on the data, or the student's velocity against the
#: frozen dense teacher's at the same x_t, t and prompt
TUNE_OBJECTIVES = ("flow", "distill")
#: the clean latent of a pre-encoded image: drawn from the codec's posterior (BAGEL's trainer) or its mean
LATENT_TARGETS = ("sample", "mean")
#: an image smaller than the training resolution: refuse the dataset, skip the image, or upscale it
SMALL_IMAGE_POLICIES = ("refuse", "skip", "upscale")
#: how prepared latents are stored (bfloat16 halves the disk; tuning reads them as float32)
LATENT_STORAGE_DTYPES = ("float32", "bfloat16")

# --- model families (families/__init__.py registers their adapters)
#: the model families the pipeline runs: the Mixture-of-Transformers (tiny default, BAGEL-7B-MoT) and
#: Qwen-Image (a Qwen2.5-VL text encoder and an MMDiT, diffusers); the first is the default
FAMILIES = ("mot", "qwen_image")

# --- where things come from and run
#: where the dense checkpoint comes from: trained by the pipeline or downloaded from the Hub
CHECKPOINT_SOURCES = ("train", "huggingface")
#: the models' parameter dtype (statistics, losses and scores stay float32)
DTYPES = ("float32", "bfloat16", "float16")

#: what tuned parameters are kept and updated in: fp32 master weights, or the model's own dtype
MASTER_DTYPES = ("float32", "model")
#: the job kinds whose verbs run one process per GPU (torchrun), the only ones that may span nodes
MULTI_PROCESS_KINDS = ("train", "tune")

#: how derived models are written: standalone copies, or deltas of their parent (``deltas``)
MODEL_STORES = ("full", "delta")
