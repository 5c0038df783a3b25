"""`snakemake -n --configfile workflow/config/qwen_image.yaml` plans the whole Qwen-Image study (no
diffusers, no weights needed to plan it), and the config checks size its grids per component."""

import pytest
import yaml

from helpers.workflow import REPO, planned_jobs, snakemake
from unisparse.config_checks import ConfigError, check_config, component_sizes

pytestmark = pytest.mark.slow  # drives Snakemake (or DVC) in subprocesses: outside the fast inner loop

CONFIG = REPO / "workflow/config/qwen_image.yaml"


def dry_run(*args):
    """`snakemake -n` of the qwen_image config in the repository itself (a dry run writes no output)."""
    return snakemake(REPO, "-n", *args, config=str(CONFIG), check=False)


def test_the_dry_run_lists_the_whole_qwen_image_dag():
    proc = dry_run()
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = planned_jobs(proc)
    config = yaml.safe_load(CONFIG.read_text())
    sweeps = config["depth"]["sweeps"]
    depth = sum(len(s["calib_task"]) if isinstance(s["calib_task"], list) else 1 for s in sweeps) * 3 * 4
    assert jobs["download_checkpoint"] == 1 and jobs["import_checkpoint"] == 1
    assert jobs["prune_depth"] == depth == 36
    assert jobs["prune_width"] == 2 * 4 + 4 + 2 * 2  # und on two tasks, gen on one, two data-free scores
    assert jobs["partition"] == 2 and jobs["tune_moe"] == 2
    assert jobs["calibrate"] == 2 and jobs["evaluate"] == 1 and jobs["all"] == 1
    assert "import-qwen-image" in dry_run("-p", "--forceall").stdout


def test_per_component_sizes_bound_the_grids():
    config = yaml.safe_load(CONFIG.read_text())
    assert component_sizes(config["model"]) == {"und": (28, 18944), "gen": (60, 12288)}
    config["depth"]["sweeps"][0]["drop"] = [29]  # the text encoder has 28 layers (the MMDiT 60)
    with pytest.raises(ConfigError, match="model.layers.und=28"):
        check_config(config)
    config = yaml.safe_load(CONFIG.read_text())
    config["moe"]["partitions"][0]["num_experts"] = 7  # 12288 is not a multiple of 7
    with pytest.raises(ConfigError, match="moe.partitions"):
        check_config(config)
