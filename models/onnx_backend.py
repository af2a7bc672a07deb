"""Run an exported stage-2 model (``stage2/export.py --format onnx``) with ONNX Runtime, called like the PyTorch model.

``OnnxRuntimeModel(path)(images)``: torch images (B, 3, H, W) in [0, 1] in, torch logits (B, 1, H/4, W/4) float32
out, on the images' device (ONNX Runtime itself runs on the CPU). H and W must be multiples of ``size_multiple``
(32 for the HRFormer and HRNet backbones: the exported graph holds the fusion path of inputs whose four branch maps
halve exactly). ``load_onnx_model(path)`` wraps it in a ``TrainedModel`` built from the metadata stored at export
(backbone, head, input size, our config), so that testing and inference use it as they use the PyTorch model.

Needs onnxruntime (in requirements.txt).
"""
from __future__ import annotations

from pathlib import Path

import torch

from utils.config import config_from_text
from utils.errors import UserError

from .checkpoint import check_weights_file
from .errors import CheckpointError
from .trained import TrainedModel

__all__ = ["ONNX_FORMAT", "ONNX_FORMAT_VERSION", "METADATA_PREFIX", "OnnxInputError", "OnnxRuntimeModel",
           "import_onnxruntime", "load_onnx_model"]

ONNX_FORMAT = "mpc-reimpl-onnx"  # value of the model's "mpc.format" metadata
# Layout of the metadata. 1: mpc.format, mpc.format_version, mpc.backbone, mpc.head, mpc.input_size,
# mpc.size_multiple, mpc.source_format, mpc.source, mpc.torch_version, [mpc.config].
ONNX_FORMAT_VERSION = 1
METADATA_PREFIX = "mpc."
_REQUIRED = ("format", "format_version", "backbone", "head", "input_size", "size_multiple")


class OnnxInputError(UserError, ValueError):
    """Images an exported model cannot take (a height or width off its size multiple, a wrong layout)."""


def import_onnxruntime():
    """The onnxruntime module, or a one-line error saying how to install it."""
    try:
        import onnxruntime
    except ImportError:
        raise CheckpointError("onnxruntime is not installed; install the project's requirements "
                              "(pip install -r requirements.txt)") from None
    return onnxruntime


def _session(source, name: str, threads: int | None):
    onnxruntime = import_onnxruntime()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: ONNX Runtime's warnings are not this project's output
    try:
        return onnxruntime.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as error:  # ONNX Runtime reports unreadable models with its own exception types
        text = " ".join(str(error).split())[:300]
        raise CheckpointError(f"{name}: not an ONNX model, or truncated or corrupt (ONNX Runtime: {text})") from None


class OnnxRuntimeModel:
    """An exported stage-2 model in an ONNX Runtime session: ``model(images)`` → logits, as the PyTorch model in eval
    mode. ``source`` is a path or the model's bytes; ``threads`` defaults to torch's thread count."""

    def __init__(self, source, threads: int | None = None, name: str | None = None):
        self.name = name or (str(source) if not isinstance(source, bytes) else "<ONNX model bytes>")
        self.session = _session(str(source) if isinstance(source, Path) else source, self.name, threads)
        stored = self.session.get_modelmeta().custom_metadata_map
        self.metadata = {key[len(METADATA_PREFIX):]: value for key, value in stored.items()
                         if key.startswith(METADATA_PREFIX)}
        if self.metadata.get("format") != ONNX_FORMAT:
            raise CheckpointError(f"{self.name}: an ONNX model not exported by this project (no '{METADATA_PREFIX}"
                                  f"format' metadata); export one with stage2/export.py --format onnx")
        missing = [key for key in _REQUIRED if key not in self.metadata]
        if missing:
            raise CheckpointError(f"{self.name}: its metadata lacks {', '.join(METADATA_PREFIX + k for k in missing)}")
        try:
            version = int(self.metadata["format_version"])
            self.input_size = int(self.metadata["input_size"])
            self.size_multiple = int(self.metadata["size_multiple"])
        except ValueError as error:
            raise CheckpointError(f"{self.name}: its metadata cannot be read ({error})") from None
        if version > ONNX_FORMAT_VERSION:
            raise CheckpointError(f"{self.name}: written by a newer version of this project (ONNX export format "
                                  f"{version}, this code reads up to {ONNX_FORMAT_VERSION})")
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1 or len(inputs[0].shape) != 4:
            raise CheckpointError(f"{self.name}: expected one 4-D image input and one output, found inputs "
                                  f"{[(i.name, i.shape) for i in inputs]} and outputs {[o.name for o in outputs]}")
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        self.backbone, self.head = self.metadata["backbone"], self.metadata["head"]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise OnnxInputError(f"{self.name}: expected images (B, 3, H, W), got {tuple(images.shape)}")
        height, width = images.shape[-2:]
        if height % self.size_multiple or width % self.size_multiple:
            raise OnnxInputError(f"{self.name}: height and width must be multiples of {self.size_multiple} for "
                                 f"this exported model, got {height}×{width}")
        array = images.detach().to("cpu", torch.float32).contiguous().numpy()
        logits = self.session.run([self.output_name], {self.input_name: array})[0]
        return torch.from_numpy(logits).to(images.device)

    def eval(self) -> "OnnxRuntimeModel":
        """Nothing to switch (an exported model is always in eval mode); here so callers may treat it as a module."""
        return self

    def __repr__(self) -> str:
        return f"OnnxRuntimeModel({self.name}, backbone={self.backbone}, head={self.head})"


def load_onnx_model(path, backbone: str | None = None, head: str | None = None,
                    threads: int | None = None) -> TrainedModel:
    """An exported .onnx file as a ``TrainedModel`` (``model`` is an ``OnnxRuntimeModel``; ``input_size()`` is the
    size the original weights were trained or tested at). A registered file is verified first, as every weights
    file; an unreadable, truncated or foreign file is a ``CheckpointError`` naming it, and so is a `backbone` or
    `head` other than the one the file was exported with."""
    path = Path(path)
    check_weights_file(path)
    model = OnnxRuntimeModel(path, threads)
    for what, asked, found in (("backbone", backbone, model.backbone), ("head", head, model.head)):
        if asked is not None and asked != found:
            raise CheckpointError(f"{path}: --{what} {asked} contradicts the model's metadata ({what} {found}); "
                                  f"leave --{what} out for exported models")
    config = None
    if model.metadata.get("config"):
        try:
            config = config_from_text(model.metadata["config"])
        except (ValueError, KeyError) as error:
            raise CheckpointError(f"{path}: its stored config cannot be read ({error})") from None
    notes = [f"ONNX Runtime {import_onnxruntime().__version__}, exported from {model.metadata.get('source', '?')} "
             f"with torch {model.metadata.get('torch_version', '?')}"]
    return TrainedModel(model, str(path), f"onnx ({model.metadata.get('source_format', '?')})", model.backbone,
                        model.head, config, None, notes)
