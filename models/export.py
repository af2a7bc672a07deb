"""Release formats of a trained stage-2 model: ONNX (images → logits, for ONNX Runtime and other runtimes) and
safetensors (the state_dict's tensors only, with the config as string metadata).

Both start from any weights ``load_trained_model`` accepts (ours or an official release), are built and checked in
memory, and are written atomically: a failed export leaves no file, and an existing output is kept unless
``overwrite``.

ONNX: the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``) traces the eval-mode model at one
size with dynamic batch, height and width. The window padding of ``models.hrformer`` is integer arithmetic on the
traced sizes, so the graph pads every size as the PyTorch model does. Height and width must be multiples of 32
(``SIZE_MULTIPLE``): the graph holds the fusion path of inputs whose four branch maps (strides 4 to 32) halve
exactly, as every 32-multiple does; other sizes take a resize in PyTorch that the graph does not hold. Why not the
dynamo exporter: it gives the same graph to rounding (checked on hrt_nano at 96-256 px) but took 120 s instead of
8 s to export hrt_nano on two cores and needs the onnxscript package besides. After export the model runs in ONNX
Runtime on random images of several sizes against the PyTorch model's eval forward: a difference above the
tolerance fails the export (nothing written).
"""
from __future__ import annotations

import copy
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from utils.errors import UserError
from utils.files import atomic_write_bytes

from .backbones import COARSEST_STRIDE
from .checkpoint import SAFETENSORS_FORMAT, SAFETENSORS_VERSION
from .onnx_backend import METADATA_PREFIX, ONNX_FORMAT, ONNX_FORMAT_VERSION, OnnxRuntimeModel
from .trained import TrainedModel, load_trained_model

__all__ = ["DEFAULT_TOLERANCE", "OPSET", "SIZE_MULTIPLE", "ExportError", "OnnxCheck", "check_onnx_model",
           "default_check_shapes", "export_onnx", "export_safetensors", "onnx_model_bytes", "refuse_existing",
           "release_metadata"]

SIZE_MULTIPLE = COARSEST_STRIDE  # exported models take heights and widths that are multiples of it
OPSET = 17  # LayerNormalization is one ONNX operator from opset 17
DEFAULT_TOLERANCE = 1e-4  # largest |ONNX Runtime − PyTorch| logit accepted, per unit of the largest |logit| above 1
_TRACE_SHAPE = (2, 3, 2 * SIZE_MULTIPLE, 3 * SIZE_MULTIPLE)  # batch 2, height ≠ width: no size is taken as fixed
INPUT_NAME, OUTPUT_NAME = "images", "logits"


class ExportError(UserError):
    """An export that cannot be done: an output that exists, a missing optional package, a failed check."""


def refuse_existing(out, overwrite: bool) -> Path:
    out = Path(out)
    if out.exists() and not overwrite:
        raise ExportError(f"{out}: exists; pass --force to replace it")
    if out.exists() and not out.is_file():
        raise ExportError(f"{out}: exists and is not a regular file")
    return out


def release_metadata(trained: TrainedModel) -> dict[str, str]:
    """What a release file says about its model, as strings: backbone, head, input size, where it came from and, for
    our models, the training config (YAML)."""
    metadata = {"stage": "2", "backbone": trained.backbone, "head": trained.head,
                "input_size": str(trained.input_size()), "source_format": trained.source_format,
                "source": Path(trained.weights).name}
    if trained.config is not None:
        metadata["config"] = trained.config.dump()
    return metadata


# --- safetensors ---------------------------------------------------------------------------------------------------

def export_safetensors(weights, out, backbone: str | None = None, head: str | None = None,
                       overwrite: bool = False) -> Path:
    """Write the stage-2 model of `weights` as a .safetensors release: its state_dict (every tensor, bit for bit)
    and ``release_metadata`` plus the format tag. It loads wherever the original does (``read_checkpoint``,
    ``load_checkpoint``, ``load_trained_model``, test and infer). Returns the path written."""
    from safetensors.torch import load as load_safetensors
    from safetensors.torch import save as save_safetensors

    out = refuse_existing(out, overwrite)
    trained = load_trained_model(weights, backbone, head)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in trained.model.state_dict().items()}
    metadata = {"format": SAFETENSORS_FORMAT, "format_version": str(SAFETENSORS_VERSION),
                **release_metadata(trained)}
    data = save_safetensors(state, metadata=metadata)
    written = load_safetensors(data)
    if written.keys() != state.keys() or not all(
            written[k].dtype == state[k].dtype and torch.equal(written[k], state[k]) for k in state):
        raise ExportError(f"{out}: the safetensors encoding of {weights} does not read back bit for bit; not written")
    return atomic_write_bytes(out, data)


# --- ONNX ------------------------------------------------------------------------------------------------------------

def _import_onnx():
    try:
        import onnx
    except ImportError:
        raise ExportError("onnx is not installed; install the project's requirements "
                          "(pip install -r requirements.txt)") from None
    return onnx


def onnx_model_bytes(model: torch.nn.Module, metadata: dict[str, str]) -> bytes:
    """The eval-mode function of a stage-2 model as an ONNX model (input "images" (B, 3, H, W) float32, output
    "logits" (B, 1, H/4, W/4); B, H and W dynamic, H and W multiples of ``SIZE_MULTIPLE``). Stored as ``mpc.*``
    metadata_props: `metadata` (at least backbone, head, input_size: ``release_metadata``) and the format tag, its
    version, the size multiple and torch's version. `model` is not changed (a frozen copy is traced)."""
    onnx = _import_onnx()
    frozen = copy.deepcopy(model).cpu().float().eval().requires_grad_(False)
    example = torch.rand(*_TRACE_SHAPE, generator=torch.Generator().manual_seed(0))
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The tracer notes the fusion's shape comparison, constant for 32-multiples (SIZE_MULTIPLE), and torch notes
        # that this exporter is the older of its two (module docstring: why it is used).
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*TorchScript-based ONNX export.*")
        with torch.no_grad():
            torch.onnx.export(frozen, (example,), buffer, dynamo=False, opset_version=OPSET,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch", 2: "height", 3: "width"},
                                            OUTPUT_NAME: {0: "batch", 2: "height_4", 3: "width_4"}})
    proto = onnx.load_from_string(buffer.getvalue())
    metadata = {"format": ONNX_FORMAT, "format_version": str(ONNX_FORMAT_VERSION), **metadata,
                "size_multiple": str(SIZE_MULTIPLE), "torch_version": torch.__version__}
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_PREFIX + key, value
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


@dataclass(frozen=True)
class OnnxCheck:
    """One comparison of ONNX Runtime with PyTorch: the input shape, the largest |Δ logit| and the largest |logit|."""

    shape: tuple[int, int, int, int]
    max_abs_difference: float
    max_abs_logit: float

    def within(self, tolerance: float) -> bool:
        return self.max_abs_difference <= tolerance * max(1.0, self.max_abs_logit)

    def __str__(self) -> str:
        batch, _, height, width = self.shape
        return (f"batch {batch} at {height}×{width}: max |ONNX Runtime − PyTorch| = {self.max_abs_difference:.2e} "
                f"(largest |logit| {self.max_abs_logit:.3g})")


def default_check_shapes(input_size: int) -> list[tuple[int, int, int, int]]:
    """Three shapes around the model's input size S (rounded to 32-multiples): batch 2 at S/2, S×S, S×1.5 S."""
    def multiple(n: float) -> int:
        return max(SIZE_MULTIPLE, int(n / SIZE_MULTIPLE + 0.5) * SIZE_MULTIPLE)  # halves round up
    size = multiple(input_size)
    return [(2, 3, multiple(size / 2), multiple(size / 2)), (1, 3, size, size), (1, 3, size, multiple(size * 1.5))]


def check_onnx_model(model: torch.nn.Module, onnx_model: OnnxRuntimeModel,
                     shapes: list[tuple[int, int, int, int]]) -> list[OnnxCheck]:
    """ONNX Runtime against `model`'s eval forward (float32, no gradient) on seeded random images in [0, 1]."""
    reference = model.eval()
    generator = torch.Generator().manual_seed(0)
    checks = []
    for shape in shapes:
        images = torch.rand(*shape, generator=generator)
        with torch.no_grad():
            expected = reference(images.to(_device_of(reference))).float().cpu()
        found = onnx_model(images)
        if found.shape != expected.shape:
            raise ExportError(f"{onnx_model.name}: ONNX Runtime returned {tuple(found.shape)} for {shape}, PyTorch "
                              f"{tuple(expected.shape)}")
        checks.append(OnnxCheck(tuple(shape), (found - expected).abs().max().item(), expected.abs().max().item()))
    return checks


def _device_of(model: torch.nn.Module) -> torch.device:
    tensor = next(model.parameters(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def export_onnx(weights, out, backbone: str | None = None, head: str | None = None, overwrite: bool = False,
                shapes: list[tuple[int, int, int, int]] | None = None, tolerance: float = DEFAULT_TOLERANCE,
                threads: int | None = None) -> list[OnnxCheck]:
    """Export the stage-2 model of `weights` to `out` (.onnx), after checking ONNX Runtime against PyTorch on
    `shapes` (default ``default_check_shapes`` of the model's input size). A difference above `tolerance` (per unit
    of the largest |logit| above 1) raises ``ExportError`` and writes nothing. Returns the checks."""
    out = refuse_existing(out, overwrite)
    trained = load_trained_model(weights, backbone, head)
    for shape in shapes or []:
        if len(shape) != 4 or shape[1] != 3 or shape[2] % SIZE_MULTIPLE or shape[3] % SIZE_MULTIPLE:
            raise ExportError(f"check shape {tuple(shape)}: expected (B, 3, H, W) with H and W multiples of "
                              f"{SIZE_MULTIPLE}")
    data = onnx_model_bytes(trained.model, release_metadata(trained))
    checks = check_onnx_model(trained.model, OnnxRuntimeModel(data, threads, name=str(out)),
                              shapes or default_check_shapes(trained.input_size()))
    failed = [check for check in checks if not check.within(tolerance)]
    if failed:
        raise ExportError(f"{out}: not written: ONNX Runtime differs from PyTorch beyond the tolerance {tolerance:g}: "
                          + "; ".join(map(str, failed)))
    atomic_write_bytes(out, data)
    return checks

