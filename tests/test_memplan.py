"""The tuning memory plan (issue 24): its terms behave as sharding, checkpointing and master weights
say they should, the paper's tunings fit 8 x 80 GB and the plan names the fewest GPUs that fit, a
model directory's exact sizes match its tensors, and an undersized ``resources.tune`` is refused by
``snakemake -n`` before any job, with the numbers."""

import shutil
from pathlib import Path

import pytest
import yaml

from helpers.models import make_model
from helpers.workflow import REPO, copy_workflow, snakemake
from unisparse import memplan
from unisparse.config_checks import ConfigError, check_config, check_config_file

PAPER = REPO / "workflow/config/paper.yaml"
GB = memplan.GB


def paper(**resources):
    config = check_config_file(PAPER)
    config["resources"]["tune"] = {**config["resources"]["tune"], **resources}
    return config


def bagel_sizes(mode="full"):
    config = check_config_file(PAPER)
    return memplan.mot_sizes_from_config(
        config["model"], mode, config["moe"]["partitions"][0] | {"dense_layers": "first_last"}, True
    )


def test_bagel_sizes_are_bagels():
    """BAGEL-7B-MoT: 14.7 B parameters less the ViT and VAE (~0.5 B, left out), 5.3 B of them in the
    26 converted generation MLPs (plus their routers), 4,096 latent tokens at 1024^2."""
    full, frozen = bagel_sizes("full"), bagel_sizes("frozen")
    assert 13.9e9 < full.total < 14.7e9
    assert 5.2e9 < full.trainable < 5.4e9
    assert frozen.trainable == 26 * 16 * 3584  # one router row per expert and converted layer
    assert full.tokens == 64 * 64 + memplan.PROMPT_TOKENS


def test_the_terms_shard_checkpoint_and_keep_masters_as_stated():
    sizes = bagel_sizes()
    one = memplan.plan(sizes, gpus=8, batch=64)
    two = memplan.plan(sizes, gpus=16, batch=64)
    for term in ("gradients", "optimizer"):
        assert two[term] == pytest.approx(one[term] / 2, rel=1e-6)
    assert two["activations"] == pytest.approx(one["activations"] / 2, rel=1e-6)
    ckpt = memplan.plan(sizes, gpus=8, batch=64, activation_checkpointing=True)
    assert ckpt["activations"] < one["activations"] / 5
    pure = memplan.plan(sizes, gpus=8, batch=64, master_dtype="model")
    assert pure["optimizer"] == one["optimizer"] / 2 and pure["gradients"] == one["gradients"] / 2
    assert one["total"] == sum(one[k] for k in ("weights", "gradients", "optimizer", "activations", "overhead"))


def test_the_papers_tunings_fit_eight_80_gb_gpus_and_name_the_fewest():
    rows = memplan.config_plans(paper())
    assert {r["job"] for r in rows} == {
        "moe 16/8 frozen", "moe 16/8 full", "moe 32/16 frozen", "moe 32/16 full",
        "control dense full", "control static full",
    }  # fmt: skip
    assert all(r["fits"] and r["gpus"] == 8 and r["gpu_mem_gb"] == 80 for r in rows)
    for row in rows:
        fewest = row["smallest_fit"]
        assert memplan.fits(memplan.plan(memplan.TuningSizes(**row["sizes"]), gpus=fewest, batch=64,
                                         activation_checkpointing=True, dtype="bfloat16"), 80)  # fmt: skip
    check_config(paper())  # the paper's own config passes


def test_an_undersized_tuning_is_refused_with_its_numbers():
    with pytest.raises(ConfigError, match=r"moe 16/8 full: \d+\.\d GB per GPU on 1 .*fewest GPUs that fit: 4"):
        check_config(paper(gpus=1))
    config = paper()
    for mode in ("frozen", "full"):
        config["moe"]["tune"][mode].pop("activation_checkpointing")
    with pytest.raises(ConfigError, match=r"activations 106\.\d.*of 72\.0 usable on 80 GB GPUs"):
        check_config(config)
    check_config(paper(gpus=4, nodes=2))  # 2 nodes x 4 GPUs: the same 8 GPUs
    no_budget = paper(gpus=1)
    no_budget["resources"]["tune"].pop("gpu_mem_gb")
    check_config(no_budget)  # no GPU memory named: nothing to check against


def test_a_model_directory_gives_its_exact_sizes(tmp_path):
    from unisparse.families.mot import MoTFamily
    from unisparse.io import save_model
    from unisparse.moe.convert import convert_to_moe

    save_model(convert_to_moe(make_model(), "gen", 4, 2, dense_layers="none"), tmp_path / "moe")
    family = MoTFamily.load_empty(tmp_path / "moe")
    sizes = memplan.sizes_from_family(family, "gen", "full", tokens=20)
    params = dict(family.model.named_parameters())
    assert sizes.total == sum(p.numel() for p in params.values())
    layer = sum(p.numel() for p in family.model.layers[0].parameters())
    assert sizes.largest_unit == layer
    assert sizes.layers == 3 and sizes.hidden == 32 and sizes.tokens == 20


@pytest.mark.slow
def test_snakemake_refuses_an_undersized_tune_resource_before_any_job(tmp_path):
    workdir = copy_workflow(tmp_path / "wf")
    config = yaml.safe_load(PAPER.read_text())
    config["resources"]["tune"]["gpus"] = 1
    (workdir / "small.yaml").write_text(yaml.safe_dump(config))
    proc = snakemake(workdir, "-n", config="small.yaml", check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "resources.tune: the tuning jobs do not fit the GPUs they ask for" in text
    assert "fewest GPUs that fit: 4" in text and not Path(workdir, "results").exists()
    shutil.rmtree(workdir)


def test_a_qwen_image_directory_is_planned_from_its_sizes(tmp_path):
    from helpers.qwen_image import write_tiny_pipeline
    from unisparse.families.qwen_image import QwenImageFamily

    write_tiny_pipeline(tmp_path / "raw")
    QwenImageFamily.load(tmp_path / "raw", require_manifest=False).save(tmp_path / "qi")
    family = QwenImageFamily.load_empty(tmp_path / "qi")
    sizes = memplan.sizes_from_family(family, "gen", "full", tokens=64)
    assert sizes.total == sum(p.numel() for p in family.model.parameters())
    assert sizes.layers == family.num_layers("gen") and sizes.hidden == sizes.kv_width == family.transformer.inner_dim
    assert memplan.plan(sizes, gpus=2, batch=4)["total"] > 0
