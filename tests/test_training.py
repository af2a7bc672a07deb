"""Training: loss goes down, resume equals an uninterrupted run, SIGKILL-safe checkpoints, non-finite steps,
DDP gradients equal to one process on the combined batch, the sampler's sharding, the stage-1 → stage-2 hand-off."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from datasets.dataset import ForgeryDataset
from datasets.flist import read_flist
from datasets.synthetic import make_synthetic_set
from models import CheckpointError, build_stage1_model, build_stage2_model
from utils.config import load_config
from utils.training.builders import build_optimizer
from utils.training.engine import NonFiniteLossError, StageHooks, Trainer
from utils.training.sampling import ResumableSampler

REPO = Path(__file__).resolve().parents[1]
SIZE = 64


@pytest.fixture(scope="module")
def synthetic_list(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("synthetic")
    return str(make_synthetic_set(out, num=16, size=SIZE, seed=0, authentic_fraction=0.0, progress=False))


def write_config(folder: Path, stage: int, flist: str, **extra) -> str:
    lines = [f"STAGE: {stage}",
             "MODEL: {BACKBONE: hrt_nano, DROP_PATH_RATE: 0.1" +
             (f", STAGE1_WEIGHTS: '{extra.pop('stage1', '')}'" if stage == 2 else "") + "}",
             f"DATA: {{INPUT_SIZE: {SIZE}, TRAIN_LISTS: [['{flist}', 1]], VAL_HOLDOUT: 2, NUM_WORKERS: 0, "
             "AUGMENT: True}",
             "TEST: {NUM_WORKERS: 0}",
             f"SOLVER: {{BATCH_SIZE: 2, LR: {1e-3 if stage == 1 else 1e-2}, MAX_STEPS: 6, VAL_EVERY: 4, LOG_EVERY: 1, "
             f"SCHEDULER: {'plateau' if stage == 1 else 'cosine'}}}"]
    path = folder / f"stage{stage}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def train_losses(out: Path) -> dict[int, float]:
    with open(out / "train.csv") as f:
        return {int(row["step"]): float(row["total"]) for row in csv.DictReader(f)}


def fixed_batch(flist: str, n: int = 2) -> dict:
    dataset = ForgeryDataset(read_flist(flist)[:n], mode="train", input_size=SIZE, augment=False)
    items = [dataset[i] for i in range(n)]
    return {"image": torch.stack([i["image"] for i in items]), "mask": torch.stack([i["mask"] for i in items])}


def losses_on_fixed_batch(trainer: Trainer, batch: dict, steps: int = 12) -> list[float]:
    """`steps` steps of the real trainer (train mode, loss, backward, optimiser) on one batch; the losses."""
    return [trainer._train_step(batch)["total"] for _ in range(steps)]


def test_stage1_loss_goes_down_on_a_fixed_batch(synthetic_list, tmp_path):
    from stage1.train import TwoViews, loss_terms
    torch.manual_seed(0)
    cfg = load_config(None, ["MODEL.BACKBONE", "hrt_nano", "SOLVER.LR", "2e-3", "DATA.NUM_WORKERS", "0"])
    model = build_stage1_model("hrt_nano", drop_path_rate=0.1)
    hooks = StageHooks(set_train_mode=lambda m: m.train(), train_step=loss_terms(cfg), validate=None)
    trainer = Trainer(cfg, str(tmp_path), model, build_optimizer(cfg, model.parameters()), _dataset(8), hooks,
                      torch.device("cpu"), forward_module=TwoViews(model))
    losses = losses_on_fixed_batch(trainer, fixed_batch(synthetic_list))
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses


def test_stage2_loss_goes_down_on_a_fixed_batch(synthetic_list, tmp_path):
    from stage2.train import head_step, set_train_mode
    torch.manual_seed(0)
    cfg = load_config(None, ["STAGE", "2", "MODEL.BACKBONE", "hrt_nano", "SOLVER.LR", "1e-2", "DATA.NUM_WORKERS",
                             "0"])
    model = build_stage2_model("hrt_nano")
    model.encoder.requires_grad_(False)
    hooks = StageHooks(set_train_mode=set_train_mode(cfg), train_step=head_step(cfg), validate=None)
    trainer = Trainer(cfg, str(tmp_path), model, build_optimizer(cfg, model.decoder.parameters()), _dataset(8), hooks,
                      torch.device("cpu"))
    frozen = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    losses = losses_on_fixed_batch(trainer, fixed_batch(synthetic_list))
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    # truly frozen: no weight and no BN statistic of the backbone moved
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(value, frozen[key]), key


def test_resumed_run_continues_with_the_same_losses_and_stage2_loads_it(synthetic_list, tmp_path):
    from stage1.train import main as stage1_main
    from stage2.train import main as stage2_main
    config = write_config(tmp_path, 1, synthetic_list)
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    stage1_main(["--config", config, "--out", str(straight), "--seed", "3"])
    stage1_main(["--config", config, "--out", str(interrupted), "--seed", "3", "--max-steps", "4"])
    with pytest.raises(SystemExit, match="--resume"):  # an existing run is never overwritten
        stage1_main(["--config", config, "--out", str(interrupted), "--seed", "3"])
    stage1_main(["--config", config, "--out", str(interrupted), "--seed", "3", "--resume"])
    expected, resumed = train_losses(straight), train_losses(interrupted)
    assert sorted(expected) == [1, 2, 3, 4, 5, 6]
    for step in (5, 6):
        assert resumed[step] == expected[step], (step, resumed[step], expected[step])
    assert (straight / "config.yaml").exists() and (straight / "best.pth").exists()

    # stage 2 trains on that backbone, loaded completely
    config2 = write_config(tmp_path, 2, synthetic_list, stage1=str(straight / "best.pth"))
    results = stage2_main(["--config", config2, "--out", str(tmp_path / "stage2"), "--max-steps", "4"])
    assert 0.0 <= results["score"] <= 1.0
    assert list((tmp_path / "stage2" / "previews").glob("*.png"))


def test_channels_last_trains_like_the_default_layout(synthetic_list, tmp_path):
    """RUNTIME.CHANNELS_LAST (meant for CUDA; the same code runs here) changes the memory layout, not the maths:
    the same seeded run gives the same first loss up to float reordering, close ones after, and the same keys."""
    from stage1.train import main as stage1_main
    config = write_config(tmp_path, 1, synthetic_list)
    default, nhwc = tmp_path / "default", tmp_path / "channels_last"
    stage1_main(["--config", config, "--out", str(default), "--seed", "3", "--max-steps", "3"])
    stage1_main(["--config", config, "--out", str(nhwc), "--seed", "3", "--max-steps", "3",
                 "RUNTIME.CHANNELS_LAST", "True"])
    expected, found = train_losses(default), train_losses(nhwc)
    assert sorted(found) == [1, 2, 3]
    assert found[1] == pytest.approx(expected[1], rel=1e-5)  # same weights and batch: only the summation order differs
    for step in (2, 3):  # AdamW's normalised updates amplify those last-bit differences in tiny gradients
        assert found[step] == pytest.approx(expected[step], rel=1e-2), step
    keys = [set(torch.load(run / "latest.pth", weights_only=True)["model"]) for run in (default, nhwc)]
    assert keys[0] == keys[1]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16-with-scaler"])
def test_mixed_precision_step_runs_the_amp_path(synthetic_list, tmp_path, monkeypatch, dtype):
    """The AMP code path (autocast around the two views and the loss; fp16 through a GradScaler), forced on the CPU
    since no GPU is at hand here: losses stay finite and near the float32 run's, and the scaler state is saved."""
    import utils.training.engine
    from stage1.train import main as stage1_main
    config = write_config(tmp_path, 1, synthetic_list)
    full = tmp_path / "float32"
    stage1_main(["--config", config, "--out", str(full), "--seed", "3", "--max-steps", "2"])
    monkeypatch.setattr(utils.training.engine, "amp_dtype", lambda mode, device: dtype)
    mixed = tmp_path / "mixed"
    stage1_main(["--config", config, "--out", str(mixed), "--seed", "3", "--max-steps", "2"])
    expected, found = train_losses(full), train_losses(mixed)
    assert sorted(found) == [1, 2] and all(np.isfinite(v) for v in found.values())
    assert found[1] == pytest.approx(expected[1], rel=0.05)  # same weights and batch; only the precision differs
    scaler = torch.load(mixed / "latest.pth", weights_only=True)["scaler"]
    assert bool(scaler) == (dtype is torch.float16)  # a disabled scaler saves an empty state


def test_stage2_refuses_a_backbone_that_does_not_fit(synthetic_list, tmp_path):
    from stage2.train import main as stage2_main
    other = build_stage1_model("hrt_tiny")
    torch.save(other.state_dict(), tmp_path / "tiny_stage1.pth")
    config = write_config(tmp_path, 2, synthetic_list, stage1=str(tmp_path / "tiny_stage1.pth"))
    with pytest.raises(CheckpointError, match="tiny_stage1.pth"):
        stage2_main(["--config", config, "--out", str(tmp_path / "out")])


def test_sigkill_at_any_moment_resumes_from_the_last_complete_checkpoint(synthetic_list, tmp_path):
    config = write_config(tmp_path, 1, synthetic_list)
    out = tmp_path / "killed"
    command = [sys.executable, str(REPO / "stage1" / "train.py"), "--config", config, "--out", str(out),
               "--max-steps", "400", "SOLVER.VAL_EVERY", "2"]  # a checkpoint every step: kills land in saves
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "latest.pth").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.5)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (out / "latest.pth").exists()
    from models.checkpoint import read_training_checkpoint
    step = read_training_checkpoint(str(out / "latest.pth"))["step"]
    resumed = subprocess.run([*command[:-4], "--max-steps", str(step + 1), "--resume"], cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert read_training_checkpoint(str(out / "latest.pth"))["step"] == step + 1


class _TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(3))

    def forward(self, x):
        return (x * self.weight).sum()


def _dataset(n):
    return [{"image": torch.full((3,), float(i)), "mask": torch.zeros(1)} for i in range(n)]


def test_non_finite_losses_are_skipped_then_stop_the_run(tmp_path):
    cfg = load_config(None, ["SOLVER.VAL_EVERY", "1000", "SOLVER.MAX_BAD_STEPS", "3", "DATA.NUM_WORKERS", "0",
                             "SOLVER.BATCH_SIZE", "1", "SOLVER.LOG_EVERY", "1"])
    bad_steps = {2, 4, 5, 6}
    calls = {"n": 0}

    def train_step(module, batch):
        calls["n"] += 1
        value = module(batch["image"])
        return {"total": value * float("nan") if calls["n"] in bad_steps else value}

    model = _TinyNet()
    hooks = StageHooks(set_train_mode=lambda m: m.train(), train_step=train_step, validate=lambda m: {"score": 0.0})
    trainer = Trainer(cfg, str(tmp_path), model, torch.optim.SGD(model.parameters(), lr=0.0), _dataset(8), hooks,
                      torch.device("cpu"))
    with pytest.warns(UserWarning, match="non-finite"), pytest.raises(NonFiniteLossError, match="3 consecutive"):
        trainer.fit(max_steps=8)
    assert trainer.skipped_nonfinite == 4 and trainer.step == 6
    assert torch.isfinite(model.weight).all()


def test_sampler_shards_are_disjoint_and_resume_mid_epoch():
    whole = list(ResumableSampler(20, batch_size=2, seed=5))
    shards = [list(ResumableSampler(20, batch_size=2, seed=5, rank=r, world_size=2)) for r in range(2)]
    indices = [i for shard in shards for i, _ in shard]
    assert len(indices) == len(set(indices)) == 20
    assert sorted(i for i, _ in whole) == list(range(20))
    sampler = ResumableSampler(20, batch_size=2, seed=5)
    sampler.set_position(0, 3)
    assert list(sampler) == whole[6:]  # same indices and same per-item seeds after a resume
    sampler.set_position(1, 0)
    assert [i for i, _ in sampler] != [i for i, _ in whole]  # a new shuffle each epoch


def _ddp_worker(rank, world_size, init_file, batch, out_file):
    import torch.distributed as dist
    from stage1.train import TwoViews, loss_terms
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    cfg = load_config(None, ["SOLVER.BATCH_SIZE", "2", "DATA.NUM_WORKERS", "0", "SOLVER.VAL_EVERY", "1000"])
    torch.manual_seed(0)
    model = build_stage1_model("hrt_nano", drop_path_rate=0.0)
    # eval-mode BN: per-sample outputs do not depend on the batch, so the shards' gradients can add up exactly
    hooks = StageHooks(set_train_mode=lambda m: m.eval(), train_step=loss_terms(cfg),
                       validate=lambda m: {"score": 0.0})
    trainer = Trainer(cfg, os.path.dirname(out_file), model, torch.optim.SGD(model.parameters(), lr=0.0),
                      _dataset(4), hooks, torch.device("cpu"), rank=rank, world_size=world_size,
                      forward_module=TwoViews(model))
    shard = {key: value[2 * rank: 2 * rank + 2] for key, value in batch.items()}
    trainer._train_step(shard)
    if rank == 0:
        torch.save({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, out_file)
    dist.destroy_process_group()


def test_ddp_gradients_equal_one_process_on_the_combined_batch(synthetic_list, tmp_path):
    from stage1.train import TwoViews, loss_terms
    batch = fixed_batch(synthetic_list, n=4)
    out_file = str(tmp_path / "ddp_grads.pt")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), batch, out_file), nprocs=2, join=True)
    ddp_grads = torch.load(out_file, weights_only=True)

    torch.manual_seed(0)
    model = build_stage1_model("hrt_nano", drop_path_rate=0.0)
    model.eval()
    cfg = load_config(None, [])
    loss_terms(cfg)(TwoViews(model), batch)["total"].backward()
    # float32 sums in another order (per rank, then all-reduced). Some gradients are exactly zero in theory (the key
    # projection's bias: softmax ignores a per-query constant) and hold only rounding noise, so errors are measured
    # against the whole gradient's scale.
    names = [name for name, param in model.named_parameters() if param.grad is not None]
    reference = torch.cat([model.get_parameter(n).grad.flatten() for n in names])
    distributed = torch.cat([ddp_grads[n].flatten() for n in names])
    assert (distributed - reference).norm() / reference.norm() < 1e-5
    for name in names:
        error = (ddp_grads[name] - model.get_parameter(name).grad).norm() / reference.norm()
        assert error < 1e-5, (name, float(error))
    compared = len(names)
    assert compared > 50


def test_exported_weights_keep_the_model_and_drop_the_training_state(tmp_path):
    from models.checkpoint import RELEASE_KEYS, export_weights
    model = build_stage2_model("hrt_nano")
    cfg = load_config(None, ["STAGE", "2", "MODEL.BACKBONE", "hrt_nano", "DATA.NUM_WORKERS", "0"])
    hooks = StageHooks(set_train_mode=lambda m: m.train(), train_step=None, validate=None)
    trainer = Trainer(cfg, str(tmp_path), model, torch.optim.AdamW(model.decoder.parameters()), _dataset(8), hooks,
                      torch.device("cpu"))
    full = trainer.save("best.pth")
    released = export_weights(full, str(tmp_path / "release.pth"))
    contents = torch.load(released, weights_only=True)
    assert set(contents) == set(RELEASE_KEYS)
    assert os.path.getsize(released) < os.path.getsize(full)
    fresh = build_stage2_model("hrt_nano")
    from models import load_checkpoint
    report = load_checkpoint(fresh, released)
    assert not report.missing and not report.mismatched
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
