"""A trained stage-2 model from a weights file: ours (which names its backbone and head in its stored config) or an
official release (whose head is recognised from its layer widths)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from utils.config import config_from_text

from .build import build_stage2_model
from .checkpoint import OUR_FORMAT, CheckpointError, read_checkpoint, safetensors_metadata
from .heads import HEADS
from .loading import load_checkpoint

__all__ = ["PROTOCOL_INPUT_SIZE", "TrainedModel", "head_from_state_dict", "load_trained_model"]

PROTOCOL_INPUT_SIZE = 512  # MPC squash-resizes every test image to 512×512


@dataclass
class TrainedModel:
    """A stage-2 model in eval mode and what it was built from."""

    model: torch.nn.Module
    weights: str
    source_format: str  # OUR_FORMAT (ours) or "official state_dict"
    backbone: str
    head: str
    config: object = None  # the training config (CfgNode) stored in our checkpoints
    load_report: object = None
    notes: list[str] = field(default_factory=list)

    def input_size(self, asked: int | None = None) -> int:
        """The squash-resize size: what was asked, else the size our checkpoint was trained at, else the
        protocol's 512 (official weights)."""
        if asked:
            return asked
        return int(self.config.DATA.INPUT_SIZE) if self.config is not None else PROTOCOL_INPUT_SIZE


def head_from_state_dict(state, source: str) -> str:
    """The head (`models.HEADS` name) whose hidden widths match the `decoder.classifier` convolutions of an official
    state_dict: the CATNet and CASIAv2 releases differ by one 128->64 layer."""
    convs = {}
    for key, value in state.items():
        parts = str(key).removeprefix("module.").split(".")
        if (len(parts) == 4 and parts[:2] == ["decoder", "classifier"] and parts[2].isdigit() and parts[3] == "weight"
                and isinstance(value, torch.Tensor) and value.ndim == 4):
            convs[int(parts[2])] = tuple(value.shape)
    if not convs:
        raise CheckpointError(f"{source}: holds no localization head (no 'decoder.classifier.*' weights); a stage-1 "
                              "backbone or an ImageNet checkpoint cannot localise: pass stage-2 weights")
    hidden = tuple(shape[0] for _, shape in sorted(convs.items())[:-1])
    for name, widths in HEADS.items():
        if widths == hidden:
            return name
    raise CheckpointError(f"{source}: its head has hidden widths {list(hidden)}, which match no known head "
                          f"({', '.join(f'{n}: {list(w)}' for n, w in HEADS.items())})")


def _our_config(checkpoint: dict, path: str):
    if int(checkpoint.get("stage", 0)) != 2:
        raise CheckpointError(f"{path}: a stage-{checkpoint.get('stage')} checkpoint; testing and inference need the "
                              "stage-2 model (backbone + head)")
    try:
        return config_from_text(checkpoint["config"])
    except (ValueError, KeyError) as error:
        raise CheckpointError(f"{path}: its stored config cannot be read ({error})") from None


def load_trained_model(path: str, backbone: str | None = None, head: str | None = None,
                       device: torch.device = torch.device("cpu")) -> TrainedModel:
    """Build the stage-2 model that `path` holds and load it (every tensor required).

    Our checkpoints carry their config, which names the backbone and head; an official bare state_dict takes
    `backbone` (default: the one a ``.safetensors`` release names in its metadata, else hrt_base) and its head is
    recognised from its layer widths (CATNet or CASIAv2 release). A ``.safetensors`` release loads like the file it
    was exported from.
    A `backbone`/`head` that contradicts our checkpoint's config is an error.
    """
    path = str(path)
    contents = read_checkpoint(path, mmap=True)  # mapped: the tensors are not held twice while loading
    if not isinstance(contents, dict):
        raise CheckpointError(f"{path}: not a state dict (the file holds a {type(contents).__name__})")
    notes = []
    if contents.get("format") == OUR_FORMAT:
        config = _our_config(contents, path)
        found = {"backbone": config.MODEL.BACKBONE, "head": config.MODEL.HEAD}
        for what, asked in (("backbone", backbone), ("head", head)):
            if asked is not None and asked != found[what]:
                raise CheckpointError(f"{path}: --{what} {asked} contradicts the checkpoint's config "
                                      f"(MODEL.{what.upper()} {found[what]}); leave --{what} out for our checkpoints")
        backbone, head, source_format = found["backbone"], found["head"], OUR_FORMAT
    elif isinstance(contents.get("model"), dict):
        raise CheckpointError(f"{path}: an ImageNet classification checkpoint ({{'model': ...}}), not a stage-2 model")
    else:
        config, source_format = None, "official state_dict"
        detected = head_from_state_dict(contents, path)
        if head is not None and head != detected:
            raise CheckpointError(f"{path}: --head {head} asked for, but the file's head is {detected}")
        stored = (safetensors_metadata(path) or {}).get("backbone")  # an exported release names its backbone
        if backbone is not None and stored is not None and backbone != stored:
            raise CheckpointError(f"{path}: --backbone {backbone} contradicts the file's metadata (backbone "
                                  f"{stored}); leave --backbone out")
        head, backbone = detected, backbone or stored or "hrt_base"
        notes.append(f"head {head} recognised from the file's layer widths")
    model = build_stage2_model(backbone, head=head)
    try:
        report = load_checkpoint(model, contents)
    except CheckpointError as error:
        hint = "" if config is not None else f"; it was built as --backbone {backbone}: is the file for another one?"
        raise CheckpointError(f"{path}: {error}{hint}") from None
    model.eval().to(device)
    return TrainedModel(model, path, source_format, backbone, head, config, report, notes)
