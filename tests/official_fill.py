"""The deterministic weight fill of the official recordings (tests/fixtures/README.md, "The weights"), shared by the
tests that compare our models and training steps with the official ones."""
import json
import math
import zlib
from pathlib import Path

import numpy as np
import torch

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def load_manifest() -> list[dict]:
    """The official stage-2 state_dict's entries: {"key", "shape", "dtype"}, in the official order."""
    return json.loads((FIXTURES / "mpc_state_dict_manifest.json").read_text())


def fill_value(name: str, shape: tuple) -> np.ndarray:
    """The fixtures README's deterministic fill rule, keyed by the official name."""
    rng = np.random.default_rng(zlib.crc32(name.encode("utf-8")))
    if name.endswith("running_var"):
        value = 0.5 + rng.random(shape)
    elif name.endswith("running_mean"):
        value = 0.1 * rng.standard_normal(shape)
    elif len(shape) >= 2:
        value = rng.standard_normal(shape) / math.sqrt(math.prod(shape[1:]))
    elif name.endswith("weight"):
        value = 1 + 0.1 * rng.standard_normal(shape)
    else:
        value = 0.1 * rng.standard_normal(shape)
    return np.asarray(value, dtype=np.float32)


def fill_weights(manifest: list[dict]) -> dict[str, torch.Tensor]:
    """The rule's float32 tensor for every floating-point entry; integer buffers are left to the model."""
    return {e["key"]: torch.from_numpy(fill_value(e["key"], tuple(e["shape"]))) for e in manifest
            if e["dtype"] == "float32"}


def under_prefix(manifest: list[dict], prefix: str) -> list[dict]:
    """The entries under `prefix` (e.g. "encoder."), renamed without it: the official stage-1 backbone's bare names."""
    return [{**e, "key": e["key"][len(prefix):]} for e in manifest if e["key"].startswith(prefix)]


def load_filled(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load filled weights by name; every name must exist in `model` (only integer buffers may be left out)."""
    result = model.load_state_dict(weights, strict=False)
    assert result.unexpected_keys == []
    left_out = model.state_dict()
    assert all(not left_out[key].is_floating_point() for key in result.missing_keys), result.missing_keys


def fill_official(model: torch.nn.Module, manifest: list[dict]) -> None:
    """Overwrite every float32 entry of the manifest; integer buffers stay as the model builds them."""
    load_filled(model, fill_weights(manifest))
