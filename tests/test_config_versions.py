"""Stored configs and checkpoints written by older versions of the project still load; newer ones are refused."""
import pytest
import torch

import utils.config as config_module
from models.checkpoint import (FORMAT_VERSION, OUR_FORMAT, CheckpointError, read_training_checkpoint,
                               save_checkpoint)
from utils.config import config_from_text, get_default_config


def test_a_stored_config_reads_back_equal():
    cfg = get_default_config()
    cfg.MODEL.BACKBONE = "hrt_nano"
    assert config_from_text(cfg.dump()) == cfg


def test_a_key_renamed_since_the_config_was_written_is_renamed(monkeypatch):
    """A config stored at today's version says SOLVER.BASE_LR 0.3; the next version renames it to SOLVER.LR."""
    today = config_module.CONFIG_VERSION
    monkeypatch.setattr(config_module, "CONFIG_VERSION", today + 1)
    monkeypatch.setattr(config_module, "CONFIG_RENAMES", {today + 1: (("SOLVER.BASE_LR", "SOLVER.LR"),)})
    stored = f"VERSION: {today}\nSTAGE: 2\nSOLVER:\n  BASE_LR: 0.3\n"
    cfg = config_from_text(stored)
    assert cfg.SOLVER.LR == 0.3 and cfg.STAGE == 2
    with pytest.raises(KeyError):  # without the rename table the old name is an unknown key
        monkeypatch.setattr(config_module, "CONFIG_RENAMES", {})
        config_from_text(stored)


def test_a_config_without_a_version_is_version_one():
    assert config_from_text("STAGE: 2\n").STAGE == 2


def test_a_key_removed_since_is_dropped():
    """TEST.THRESHOLD (never read) left in version 2; configs stored before, like the demo weights', still load."""
    cfg = config_from_text("STAGE: 2\nTEST:\n  THRESHOLD: 0.5\n  NUM_WORKERS: 3\n")
    assert "THRESHOLD" not in cfg.TEST and cfg.TEST.NUM_WORKERS == 3


def test_a_config_from_a_newer_version_is_refused():
    with pytest.raises(ValueError, match="newer"):
        config_from_text(f"VERSION: {config_module.CONFIG_VERSION + 1}\n")


def test_text_that_is_not_a_config_is_refused():
    with pytest.raises(ValueError, match="YAML"):
        config_from_text("MODEL: [unclosed\n")


def test_a_format_one_training_checkpoint_still_resumes(tmp_path):
    """Files written before the "version" and "skipped_samples" keys existed."""
    path = tmp_path / "old.pth"
    torch.save({"format": OUR_FORMAT, "stage": 1, "model": {}, "step": 3}, path)
    contents = read_training_checkpoint(path)
    assert contents["version"] == 1 and contents["skipped_samples"] == 0 and contents["step"] == 3


def test_a_checkpoint_from_a_newer_format_is_refused(tmp_path):
    path = tmp_path / "new.pth"
    torch.save({"format": OUR_FORMAT, "version": FORMAT_VERSION + 1, "stage": 1}, path)
    with pytest.raises(CheckpointError, match="newer"):
        read_training_checkpoint(path)


def test_save_checkpoint_tags_the_format_and_version(tmp_path):
    path = save_checkpoint({"stage": 2, "step": 7}, tmp_path / "c.pth")
    contents = torch.load(path, weights_only=True)
    assert contents == {"format": OUR_FORMAT, "version": FORMAT_VERSION, "stage": 2, "step": 7}


def test_a_foreign_file_is_not_a_training_checkpoint(tmp_path):
    path = tmp_path / "bare.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="not a checkpoint of this project"):
        read_training_checkpoint(path)
