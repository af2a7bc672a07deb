"""Stage 2: train the localization head on the frozen stage-1 backbone.

The backbone comes from MODEL.STAGE1_WEIGHTS through `models.load_checkpoint`; a backbone left partly unset is an
error (the official hand-off silently trains on a random backbone, docs/MPC_SPEC.md §9.1). By default the backbone
is truly frozen (eval mode, no gradients); STAGE2.FAITHFUL_TRAIN_MODE True reproduces the official run, whose
backbone stays in train mode (BN statistics drift, DropPath on, §9.3). Focal loss (or BCE), AdamW on the head, cosine annealing
stepped per validation, model selection by mean F1/IoU (MPC protocol).

    python stage2/train.py --config configs/stage2_hrt_base.yaml --out runs/stage2 MODEL.STAGE1_WEIGHTS runs/stage1/best.pth
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python stage2/train.py`: make the repository's packages importable first
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from losses import build_head_loss
from models import build_stage2_model, load_checkpoint
from utils.entry import run_script
from utils.training.builders import build_datasets, build_optimizer, prepare_model
from utils.training.cli import start_run
from utils.training.engine import StageHooks, Trainer
from utils.evaluation.loop import evaluate, validation_summary
from utils.evaluation.prediction import probability_predictor
from utils.evaluation.visualize import prediction_grid

PREVIEW_IMAGES = 4  # validation predictions drawn into TensorBoard and OUT/previews/


def set_train_mode(cfg):
    def apply(model):
        model.train()
        if cfg.STAGE2.FREEZE_BACKBONE and not cfg.STAGE2.FAITHFUL_TRAIN_MODE:
            model.encoder.eval()
    return apply


def head_step(cfg):
    head_loss = build_head_loss(cfg.LOSS.HEAD)

    def train_step(module, batch):
        loss = head_loss(module(batch["image"]), batch["mask"])
        return {"total": loss, cfg.LOSS.HEAD: loss}
    return train_step


def head_validation(cfg, val_sets, device):
    def validate(model):
        previews = []

        def keep_preview(item, prediction):
            if len(previews) < PREVIEW_IMAGES:
                image = (item["image"].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
                previews.append((image, item["mask"].numpy() > 0.5, prediction.probability()))

        predict = probability_predictor(model)
        results = {name: evaluate(predict, dataset, device, num_workers=cfg.TEST.NUM_WORKERS, desc=f"val {name}",
                                  on_image=keep_preview, batch_size=cfg.TEST.BATCH_SIZE)
                   for name, dataset in val_sets.items()}
        summary = validation_summary(results)
        if previews:
            summary["images"] = prediction_grid(*zip(*previews))
        return summary
    return validate


def build_model(cfg, device, world_size, logger):
    model = build_stage2_model(cfg.MODEL.BACKBONE, head=cfg.MODEL.HEAD, drop_path_rate=cfg.MODEL.DROP_PATH_RATE)
    if not cfg.MODEL.STAGE1_WEIGHTS:
        raise SystemExit("stage 2 needs the stage-1 backbone: set MODEL.STAGE1_WEIGHTS (e.g. runs/stage1/best.pth "
                         "or the official MPC_CATNet_stage1_weights.pth)")
    report = load_checkpoint(model, cfg.MODEL.STAGE1_WEIGHTS, require=("encoder",))
    logger.info(f"stage-1 backbone from {cfg.MODEL.STAGE1_WEIGHTS}: {report}")
    if cfg.STAGE2.FREEZE_BACKBONE:
        model.encoder.requires_grad_(False)
    return prepare_model(cfg, model, device, world_size)


def main(argv=None) -> dict:
    run = start_run(argv, stage=2, description=__doc__.splitlines()[0])
    args, cfg, device, world_size, logger = run.args, run.cfg, run.device, run.world_size, run.logger

    model = build_model(cfg, device, world_size, logger)
    trainable = model.decoder.parameters() if cfg.STAGE2.FREEZE_BACKBONE else model.parameters()
    optimizer = build_optimizer(cfg, trainable)
    train_set, val_sets, collate = build_datasets(cfg, logger)
    hooks = StageHooks(set_train_mode=set_train_mode(cfg), train_step=head_step(cfg),
                       validate=head_validation(cfg, val_sets, device))
    trainer = Trainer(cfg, args.out, model, optimizer, train_set, hooks, device, collate_fn=collate,
                      rank=run.rank, world_size=world_size)
    return trainer.run(run.checkpoint, logger)


if __name__ == "__main__":
    run_script(main)
