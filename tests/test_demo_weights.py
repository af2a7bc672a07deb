"""The demo weights shipped in weights/ load through the registry check and localise fresh synthetic forgeries."""
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from datasets.dataset import ForgeryDataset
from datasets.synthetic import make_synthetic_set
from models import load_trained_model
from utils.evaluation.metrics import upsample_probability

DEMO_WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "mpc_demo_hrt_nano_stage2.pth"


@pytest.mark.skipif(not DEMO_WEIGHTS.is_file(), reason="the demo weights are not in this checkout")
def test_demo_weights_localise_unseen_synthetic_forgeries(tmp_path, one_thread):
    # The demo's data recipe (make demo: --kinds splice,copymove --difficulty 0 --shapes 0) with a seed that neither
    # its training (0) nor its test set (1) used.
    flist = make_synthetic_set(tmp_path, num=8, size=128, seed=2, kinds=("splice", "copymove"),
                               authentic_fraction=0.0, difficulty=0.0, shapes=(0, 0), progress=False)
    trained = load_trained_model(str(DEMO_WEIGHTS))  # checks the registered size and sha256 first
    assert (trained.backbone, trained.head, trained.input_size()) == ("hrt_nano", "catnet", 128)
    dataset = ForgeryDataset(np.load(flist), mode="test", input_size=128)
    model_f1, all_forged_f1 = [], []
    for index in range(len(dataset)):
        item = dataset[index]
        gt = item["mask"].reshape(item["mask"].shape[-2:]).numpy() > 0.5
        with torch.no_grad():
            prob = torch.sigmoid(trained.model(item["image"].unsqueeze(0)))[0, 0]
        predicted = upsample_probability(prob, gt.shape) > 127  # docs/METRICS.md: the map on 0-255 above int(0.5 * 255)
        model_f1.append(f1_score(gt.ravel(), predicted.ravel(), zero_division=0))
        all_forged_f1.append(f1_score(gt.ravel(), np.ones(gt.size, bool), zero_division=0))
    assert np.mean(model_f1) > 0.7 and np.mean(model_f1) > np.mean(all_forged_f1) + 0.4
