"""Shared data of the viewer's tests (`make test-app`; needs requirements-app.txt, which `make test` never installs)."""
from pathlib import Path

import numpy as np
import pytest
import torch

from datasets.synthetic import make_sample
from utils.files import write_png

REPO = Path(__file__).resolve().parents[1]
DEMO_WEIGHTS = REPO / "weights" / "mpc_demo_hrt_nano_stage2.pth"

torch.set_num_threads(1)  # a shared 2-core machine


@pytest.fixture(scope="session")
def spliced(tmp_path_factory):
    """A 120×160 (not square) splice with its mask, written as PNGs: (image path, mask path, bool mask).

    The demo model was trained on exactly this trace (a region carrying noise of σ 20 more than its host), so its map
    has forged, pristine and in-between pixels: thresholds other than 0.5 give other masks."""
    folder = tmp_path_factory.mktemp("spliced")
    image, mask = make_sample("splice", 160, np.random.default_rng(3), difficulty=0.0, shapes=(0, 0))
    image, mask = image[:120], mask[:120]
    image_path, mask_path = folder / "splice.png", folder / "splice_gt.png"
    write_png(image_path, image)
    write_png(mask_path, mask.astype(np.uint8) * 255)
    return image_path, mask_path, mask
