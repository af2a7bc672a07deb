"""What a training script builds — model, optimiser, scheduler, step and mode hooks, datasets — without training,
and the kinds of normalisation layer in it.

`build_run` runs a stage script's real `main` as the command line would, with three things replaced so that it
needs no data, no weights file and no time: the file lists are generated rows named after each list, stage 2 does
not read its backbone file, and the Trainer is the real one whose `run` only hands itself back. The tests of the
recipe and its wiring then inspect the objects the script really built.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from utils.training.engine import Trainer

ROWS_PER_LIST = 2000  # enough for the default held-out split of 1000 images


def generated_list(path) -> np.ndarray:
    """(ROWS_PER_LIST, 2) rows `<list stem>/<i>.png`, `<list stem>/<i>_gt.png`, without reading `path`."""
    stem = Path(path).stem
    images = np.char.add(f"{stem}/", np.arange(ROWS_PER_LIST).astype(str))
    return np.stack([np.char.add(images, ".png"), np.char.add(images, "_gt.png")], axis=1)


class BuiltRun(Trainer):
    """The real Trainer, constructed by the script; `run` trains nothing and keeps the instance."""

    last: "BuiltRun | None" = None

    def run(self, resume_from, logger) -> dict:
        BuiltRun.last = self
        return {}


def defaults_yaml(folder, stage: int) -> Path:
    """A config naming only the stage (and, for stage 2, a backbone file, which build_run does not read): every
    other value is a default of utils/config.py."""
    path = Path(folder) / f"defaults_stage{stage}.yaml"
    path.write_text(f"STAGE: {stage}\n" + ("MODEL:\n  STAGE1_WEIGHTS: stage1.pth\n" if stage == 2 else ""))
    return path


def build_run(stage: int, config: str, out_dir, overrides: list[str] | tuple[str, ...] = ()) -> Trainer:
    """The Trainer that `stage{stage}/train.py --config CONFIG --out OUT_DIR --device cpu OVERRIDES` builds."""
    import stage1.train
    import stage2.train

    script = {1: stage1.train, 2: stage2.train}[stage]
    BuiltRun.last = None
    with pytest.MonkeyPatch.context() as patch:
        # every binding the training scripts read lists through
        for where in ("datasets.flist", "datasets.mixture", "utils.training.builders"):
            patch.setattr(f"{where}.read_flist", generated_list)
        patch.setattr(script, "Trainer", BuiltRun)
        if stage == 2:
            patch.setattr(script, "load_checkpoint", lambda model, path, **kwargs: "not read by the test")
        else:  # the ImageNet file of the faithful YAML is not here; loading it is tested elsewhere
            overrides = ["MODEL.IMAGENET_WEIGHTS", "", *overrides]
        script.main(["--config", str(config), "--out", str(out_dir), "--device", "cpu", *overrides])
    assert BuiltRun.last is not None, "the script did not reach Trainer.run"
    return BuiltRun.last


def training_dataset(run: Trainer):
    """The ForgeryDataset the script built, under the Trainer's wrappers (each keeps what it wraps in `dataset`)."""
    dataset = run.train_set
    while hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    return dataset


def norm_kind(name: str) -> str:
    """The kind of a normalisation layer, from its qualified name in a stage-1 or stage-2 model (docs/MPC_SPEC.md §2, §4)."""
    if name.startswith("decoder."):
        return "head"
    name = name.removeprefix("encoder.")
    if name in ("bn1", "bn2"):
        return "stem"
    for prefix, kind in (("layer1.", "bottleneck"), ("convs.", "projection"), ("transition", "transition")):
        if name.startswith(prefix):
            return kind
    if ".fuse_layers." in name:
        return "fusion"
    if ".mlp.norm" in name:
        return "transformer_ffn"
    return "unclassified"
