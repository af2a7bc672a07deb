"""Stage 1: multi-view pixel-contrastive pre-training of the backbone.

Each batch goes through the backbone twice in train mode (two stochastic-depth views); the within-image,
cross-scale and cross-modality InfoNCE terms are summed; AdamW over all backbone parameters; ReduceLROnPlateau on
the validation score (k-means on the fused normalised features, the smaller cluster called forged).

    python stage1/train.py --config configs/stage1_hrt_base.yaml --out runs/stage1 [KEY VALUE ...]
    torchrun --nproc_per_node 4 stage1/train.py --config … --out …
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python stage1/train.py`: make the repository's packages importable first
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn as nn

from losses import multi_view_pixel_contrast
from models import build_stage1_model
from utils.entry import run_script
from utils.training.builders import build_datasets, build_optimizer, prepare_model
from utils.training.cli import start_run
from utils.training.engine import StageHooks, Trainer
from utils.evaluation.loop import evaluate, validation_summary
from utils.evaluation.kmeans import OFFICIAL_SEED, kmeans_forgery_mask


class TwoViews(nn.Module):
    """Runs the backbone twice on the same batch so that DDP sees one forward per step."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor):
        return self.model(images), self.model(images)


def scale1_mask(mask: torch.Tensor) -> torch.Tensor:
    """The dataset's B×1×h×w training masks as the B×h×w the loss takes."""
    return mask.flatten(0, -3) if mask.dim() == 4 else mask


def loss_terms(cfg):
    weights = {"within_image": cfg.LOSS.WITHIN_IMAGE, "cross_scale": cfg.LOSS.CROSS_SCALE,
               "cross_modality": cfg.LOSS.CROSS_MODALITY}

    def train_step(module, batch):
        view1, view2 = module(batch["image"])
        return multi_view_pixel_contrast(view1, view2, scale1_mask(batch["mask"]), max_samples=cfg.LOSS.MAX_SAMPLES,
                                         temperature=cfg.LOSS.TEMPERATURE, weights=weights,
                                         positives=cfg.LOSS.POSITIVES, share_samples=cfg.LOSS.SHARE_SAMPLES)
    return train_step


def kmeans_validation(cfg, val_sets, device):
    """Official stage-1 validation: k-means (k = 2, cosine) on the fused normalised features of each image."""
    def validate(model):
        def predict(images):
            generator = torch.Generator(device="cpu").manual_seed(OFFICIAL_SEED)
            return kmeans_forgery_mask(model(images), generator=generator).float()

        results = {name: evaluate(predict, dataset, device, num_workers=cfg.TEST.NUM_WORKERS, desc=f"val {name}")
                   for name, dataset in val_sets.items()}
        return validation_summary(results)

    return validate


def main(argv=None) -> dict:
    run = start_run(argv, stage=1, description=__doc__.splitlines()[0])
    args, cfg, device, world_size, logger = run.args, run.cfg, run.device, run.world_size, run.logger

    weights_file = cfg.MODEL.IMAGENET_WEIGHTS or None
    model = build_stage1_model(cfg.MODEL.BACKBONE, drop_path_rate=cfg.MODEL.DROP_PATH_RATE, normalize=True,
                               pretrained_path=weights_file)
    logger.info(f"backbone {cfg.MODEL.BACKBONE}: " + (f"starting from ImageNet weights {weights_file}"
                                                      if weights_file else "trained from scratch (no ImageNet weights "
                                                      "named in MODEL.IMAGENET_WEIGHTS)"))
    model = prepare_model(cfg, model, device, world_size)
    optimizer = build_optimizer(cfg, model.parameters())
    train_set, val_sets, collate = build_datasets(cfg, logger)

    hooks = StageHooks(set_train_mode=lambda m: m.train(), train_step=loss_terms(cfg),
                       validate=kmeans_validation(cfg, val_sets, device))
    trainer = Trainer(cfg, args.out, model, optimizer, train_set, hooks, device, collate_fn=collate,
                      rank=run.rank, world_size=world_size, forward_module=TwoViews(model))
    return trainer.run(run.checkpoint, logger)


if __name__ == "__main__":
    run_script(main)
