"""hub.inputs: a lock decides the repository and commit of each outside input the jobs read, and
each job takes exactly the manifests of the inputs it reads (unisparse.hub_inputs)."""

import pytest

from unisparse.choices import HUB_INPUT_ROLES
from unisparse.config_checks import ConfigError
from unisparse.hub_inputs import ROLES, calibration_roles, evaluation_roles, locked_sections

MME = {"repo_id": "lmms-lab/MME", "revision": "d" * 40}
DETECTOR = {"repo_id": "facebook/mask2former-swin-small-coco-instance", "revision": "a" * 40}


def test_locks_fill_the_ids_and_commits_of_both_sections():
    config = {"evaluate": {"benchmarks": {"gen": "geneval", "und": "mme"}}, "calibrate": {"calib_items": 4}}
    sections = locked_sections(config, {"mme": MME, "detector": DETECTOR})
    assert sections["evaluate"]["mme_dataset"] == "lmms-lab/MME" and sections["evaluate"]["mme_revision"] == "d" * 40
    assert sections["calibrate"] == {"calib_items": 4, "mme_dataset": "lmms-lab/MME", "mme_revision": "d" * 40}
    assert sections["evaluate"]["detector_revision"] == "a" * 40
    assert "mme_revision" not in config["evaluate"]  # the config itself is left as it was


@pytest.mark.parametrize("key, value", [("mme_dataset", "someone/MME-fork"), ("mme_revision", "main")])
def test_a_setting_the_lock_contradicts_is_refused(key, value):
    with pytest.raises(ConfigError, match=f"evaluate.{key}: '{value}', but hub.inputs.mme locks"):
        locked_sections({"evaluate": {key: value}}, {"mme": MME})
    locked_sections({"evaluate": {key: MME["repo_id"] if key == "mme_dataset" else MME["revision"]}}, {"mme": MME})


def test_unknown_role_is_refused():
    with pytest.raises(ConfigError, match="unknown role"):
        locked_sections({}, {"tokenizer": MME})


def test_which_jobs_read_which_inputs():
    assert tuple(ROLES) == HUB_INPUT_ROLES
    assert evaluation_roles({"gen": "geneval", "und": "mme"}) == ["clip", "detector", "mme"]
    assert evaluation_roles({"gen": "shapes_geneval", "und": "shapesqa"}) == []
    assert calibration_roles({"benchmarks": {"und": "mme"}}, "und") == ["calib", "mme"]
    assert calibration_roles({"benchmarks": {"und": "mme"}}, "gen") == []
    assert calibration_roles({"benchmarks": {"und": "shapesqa"}}, "und") == []
