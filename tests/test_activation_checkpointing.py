"""Activation checkpointing (RUNTIME.ACTIVATION_CHECKPOINTING) leaves the stage-1 step exactly what it was.

The real stage-1 step (stage1/train.py's TwoViews and loss_terms) with DropPath at 0.2 and train-mode BatchNorm,
plain and checkpointed from the same weights, batch and random state: the same loss, views and gradients (float64:
1e-10 relative; float32: 1e-5), the same BN running statistics, updated twice per step as the two views make them
(never again by the recomputation), the same random stream afterwards. Then the same through the training engine
under DDP (gloo, two processes), bf16 autocast (forced on the CPU), channels_last, and across a resume. Two negative
controls show that the draws' replay and the BN restoration are what makes the steps equal.
"""
from __future__ import annotations

import contextlib
import copy
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.utils.checkpoint

import models.activation_checkpointing as activation_checkpointing
from models import build_stage1_model
from models.activation_checkpointing import checkpointed_regions, set_activation_checkpointing
from stage1.train import TwoViews, loss_terms
from utils.config import load_config
from utils.training.builders import prepare_model
from utils.training.engine import StageHooks, Trainer

SIZE = 64  # input side: scale-1 maps of 16², hrt_nano's four branches down to 2²
GRANULARITIES = ["block", "module"]
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny float64 models: one thread each is faster on 2 cores


def make_batch(dtype=torch.float64, batch_size: int = 2, size: int = SIZE) -> dict:
    """Random images and one forged rectangle per image (different per image), as the dataset hands them over."""
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(batch_size, 3, size, size, generator=generator, dtype=dtype)
    masks = torch.zeros(batch_size, 1, size // 4, size // 4, dtype=dtype)
    side = size // 8
    for i in range(batch_size):
        masks[i, 0, 1 + i: 1 + i + side, 2: 2 + side - i] = 1
    return {"image": images, "mask": masks}


def config(*overrides: str):
    return load_config(None, ["MODEL.BACKBONE", "hrt_nano", "DATA.NUM_WORKERS", "0", "SOLVER.BATCH_SIZE", "2",
                              "SOLVER.VAL_EVERY", "1000", *overrides])


def initial_model(dtype=torch.float64):
    torch.manual_seed(0)
    return build_stage1_model("hrt_nano", drop_path_rate=0.2).to(dtype).train()


class RecordingTwoViews(TwoViews):
    """stage1.train.TwoViews that also keeps (detached) what each view returned."""

    def forward(self, images):
        views = super().forward(images)
        self.views = [[t.detach().clone() for t in view] for view in views]
        return views


def take_step(model, batch, seed: int = 7) -> dict:
    """One stage-1 step (loss_terms on the two views, backward): everything the comparison needs, and the bytes of
    the distinct tensors autograd kept for backward outside checkpointed regions."""
    storages = {}

    def keep(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor
    torch.manual_seed(seed)
    two_views = RecordingTwoViews(model)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        losses = loss_terms(config())(two_views, batch)
    losses["total"].backward()
    return {"loss": losses["total"].detach(), "views": two_views.views, "rng": torch.get_rng_state(),
            "saved_bytes": sum(storages.values()),
            "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None},
            "buffers": {n: b.detach().clone() for n, b in model.named_buffers()}}


def relative_errors(expected: dict, found: dict) -> dict:
    """‖found − expected‖ / ‖expected‖ per tensor; a tensor that is tiny next to the whole set (gradients that are
    zero in theory and hold rounding noise, e.g. the key projection's bias) is measured against 1e-6 of the whole."""
    assert set(found) == set(expected)
    whole = torch.cat([e.flatten().double() for e in expected.values()]).norm()
    return {name: float((found[name].double() - e.double()).norm() / torch.maximum(e.double().norm(), 1e-6 * whole))
            for name, e in expected.items()}


def assert_all_close(expected: dict, found: dict, tolerance: float) -> None:
    errors = relative_errors(expected, found)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= tolerance, (worst, errors[worst])


def batchnorm_counts(buffers: dict) -> dict:
    return {name: int(value) for name, value in buffers.items() if name.endswith("num_batches_tracked")}


# ---- the step itself, float64 ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def start():
    return initial_model(), make_batch()


@pytest.fixture(scope="module")
def plain_step(start):
    model, batch = start
    return take_step(copy.deepcopy(model), batch)


@pytest.fixture(scope="module", params=GRANULARITIES)
def checkpointed_step(request, start):
    model, batch = copy.deepcopy(start[0]), start[1]
    regions = set_activation_checkpointing(model, request.param)
    # hrt_nano: 3 high-resolution modules (one per stage) of 2, 3, 4 branches × 2 blocks = 18 blocks
    assert regions == {"block": 18, "module": 3}[request.param]
    return take_step(model, batch)


def test_loss_and_every_gradient_equal_the_plain_step(plain_step, checkpointed_step):
    assert float(abs(checkpointed_step["loss"] - plain_step["loss"])) <= 1e-10 * float(abs(plain_step["loss"]))
    assert len(plain_step["grads"]) > 100  # every parameter of the backbone and its projections has a gradient
    assert_all_close(plain_step["grads"], checkpointed_step["grads"], 1e-10)


def test_dropout_draws_are_replayed_and_the_two_views_still_differ(plain_step, checkpointed_step):
    for plain_view, view in zip(plain_step["views"], checkpointed_step["views"]):
        for expected, found in zip(plain_view, view):
            assert torch.equal(found, expected)  # the forward is the plain forward: same draws, same values
    view1, view2 = checkpointed_step["views"]
    assert max(float((a - b).abs().max()) for a, b in zip(view1, view2)) > 1e-3  # DropPath made them differ
    # the recomputation ran on a restored copy of the random state: the stream continues as after the plain step
    assert torch.equal(checkpointed_step["rng"], plain_step["rng"])


def test_batchnorm_statistics_are_updated_once_per_view(plain_step, checkpointed_step):
    counts = batchnorm_counts(checkpointed_step["buffers"])
    assert len(counts) > 50 and set(counts.values()) == {2}  # two views, two updates, as in the plain step
    assert batchnorm_counts(plain_step["buffers"]) == counts
    assert_all_close(plain_step["buffers"], checkpointed_step["buffers"], 1e-10)  # running means and variances


def test_without_replaying_the_draws_and_restoring_batchnorm_the_step_would_differ(start, plain_step, monkeypatch):
    """Negative control: the same checkpointing with the random state not restored for the recomputation and the
    BN statistics not put back after it: other gradients, and BN layers inside the regions count 4 batches."""
    def checkpoint_forgetting_the_draws(function, *inputs, **options):
        return torch.utils.checkpoint.checkpoint(function, *inputs, **{**options, "preserve_rng_state": False})
    monkeypatch.setattr(activation_checkpointing, "checkpoint", checkpoint_forgetting_the_draws)
    monkeypatch.setattr(activation_checkpointing, "_batchnorm_statistics_restored",
                        lambda region: contextlib.nullcontext())
    model = copy.deepcopy(start[0])
    set_activation_checkpointing(model, "block")
    found = take_step(model, start[1])
    assert max(relative_errors(plain_step["grads"], found["grads"]).values()) > 1e-3
    counts = batchnorm_counts(found["buffers"])
    inside_blocks = {name: n for name, n in counts.items() if ".branches." in name}
    assert inside_blocks and set(inside_blocks.values()) == {4}
    assert {n for name, n in counts.items() if name not in inside_blocks} == {2}  # outside the regions: untouched


def test_checkpointing_keeps_less_for_backward(plain_step, checkpointed_step):
    """What autograd keeps outside the regions (their inputs aside): the point of it all, and proof it is on."""
    assert checkpointed_step["saved_bytes"] < 0.5 * plain_step["saved_bytes"]


def test_off_restores_the_plain_modules_and_evaluation_runs_plainly(start):
    model, batch = copy.deepcopy(start[0]), start[1]
    plain_classes = [type(m) for m in model.modules()]
    set_activation_checkpointing(model, "module")
    assert checkpointed_regions(model) == 3
    model.eval()  # validation: no recomputation, the plain forward's values
    with torch.no_grad():
        checkpointed_eval = model(batch["image"])
    set_activation_checkpointing(model, "off")
    assert checkpointed_regions(model) == 0 and [type(m) for m in model.modules()] == plain_classes
    with torch.no_grad():
        for expected, found in zip(model(batch["image"]), checkpointed_eval):
            assert torch.equal(found, expected)


def test_the_config_switch_and_its_refusals():
    assert load_config(None, []).RUNTIME.ACTIVATION_CHECKPOINTING == "off"  # off by default
    model = prepare_model(config("RUNTIME.ACTIVATION_CHECKPOINTING", "block"), initial_model(torch.float32),
                          torch.device("cpu"), world_size=1)
    assert checkpointed_regions(model) == 18
    with pytest.raises(ValueError, match="one of"):
        set_activation_checkpointing(model, "blocks")
    with pytest.raises(ValueError, match="HRFormer"):
        set_activation_checkpointing(torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1)), "block")


# ---- through the training engine: channels_last, AMP, resume, DDP -----------------------------------------------

def _items(n: int) -> list:
    return [{"image": torch.zeros(3, SIZE, SIZE), "mask": torch.zeros(1, SIZE // 4, SIZE // 4)} for _ in range(n)]


def engine_step(cfg, model, batch, out_dir, seed: int = 7, amp=None, trainer_args=None) -> dict:
    """One `Trainer._train_step` (the engine's own step: train mode, batch layout, autocast, backward, optimiser)
    on a model prepared from `cfg`; its losses, gradients and buffers. SGD with lr 0 keeps the weights."""
    model = prepare_model(cfg, model, torch.device("cpu"), world_size=(trainer_args or {}).get("world_size", 1))
    hooks = StageHooks(set_train_mode=lambda m: m.train(), train_step=loss_terms(cfg), validate=None)
    trainer = Trainer(cfg, str(out_dir), model, torch.optim.SGD(model.parameters(), lr=0.0), _items(4), hooks,
                      torch.device("cpu"), forward_module=TwoViews(model), **(trainer_args or {}))
    trainer.amp = amp
    torch.manual_seed(seed)
    losses = trainer._train_step(batch)
    return {"loss": losses["total"],
            "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None},
            "buffers": {n: b.detach().clone() for n, b in model.named_buffers()}}


def assert_engine_steps_equal(plain: dict, checkpointed: dict, tolerance: float) -> None:
    assert abs(checkpointed["loss"] - plain["loss"]) <= tolerance * abs(plain["loss"])
    assert_all_close(plain["grads"], checkpointed["grads"], tolerance)
    assert batchnorm_counts(checkpointed["buffers"]) == batchnorm_counts(plain["buffers"])
    assert set(batchnorm_counts(plain["buffers"]).values()) == {2}
    assert_all_close(plain["buffers"], checkpointed["buffers"], tolerance)


def test_channels_last_float64(start, tmp_path):
    model, batch = start
    plain = engine_step(config("RUNTIME.CHANNELS_LAST", "True"), copy.deepcopy(model), batch, tmp_path / "plain")
    found = engine_step(config("RUNTIME.CHANNELS_LAST", "True", "RUNTIME.ACTIVATION_CHECKPOINTING", "block"),
                        copy.deepcopy(model), batch, tmp_path / "checkpointed")
    assert_engine_steps_equal(plain, found, 1e-10)


def test_bf16_autocast_float32(tmp_path):
    """The AMP path (autocast around the views and the loss), forced on the CPU: the recomputation runs under the
    forward's autocast state, so the bf16 step is reproduced too. 32² inputs: bf16 convolutions have no fast kernel
    on most CPUs."""
    model, batch = initial_model(torch.float32), make_batch(torch.float32, size=32)
    plain = engine_step(config(), copy.deepcopy(model), batch, tmp_path / "plain", amp=torch.bfloat16)
    found = engine_step(config("RUNTIME.ACTIVATION_CHECKPOINTING", "module"), copy.deepcopy(model), batch,
                        tmp_path / "checkpointed", amp=torch.bfloat16)
    assert_engine_steps_equal(plain, found, 1e-5)


def test_resume_into_a_checkpointed_run_float32(tmp_path):
    """A checkpoint written by a plain run resumes into a checkpointed run (same state_dict keys, strict load) and
    the next step equals the plain run's own next step: loss, gradients, BN statistics (float32: 1e-5)."""
    batch = make_batch(torch.float32)

    def trainer_for(granularity: str, out: str) -> Trainer:
        cfg = config("RUNTIME.ACTIVATION_CHECKPOINTING", granularity)
        model = prepare_model(cfg, initial_model(torch.float32), torch.device("cpu"), world_size=1)
        hooks = StageHooks(set_train_mode=lambda m: m.train(), train_step=loss_terms(cfg), validate=None)
        return Trainer(cfg, str(tmp_path / out), model, torch.optim.AdamW(model.parameters(), lr=1e-3), _items(4),
                       hooks, torch.device("cpu"), forward_module=TwoViews(model))

    def step_results(trainer: Trainer) -> dict:
        losses = trainer._train_step(batch)
        return {"loss": losses["total"], "buffers": {n: b.clone() for n, b in trainer.model.named_buffers()},
                "grads": {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}}

    plain = trainer_for("off", "plain")
    torch.manual_seed(3)
    plain._train_step(batch)
    plain.step = 1
    saved = plain.save("latest.pth")
    expected = step_results(plain)  # the plain run goes on
    resumed = trainer_for("block", "checkpointed")
    assert set(resumed.model.state_dict()) == set(plain.model.state_dict())
    resumed.resume(saved)  # model, optimiser and random streams as the plain run left them at the save
    found = step_results(resumed)
    assert abs(found["loss"] - expected["loss"]) <= 1e-5 * abs(expected["loss"])
    assert_all_close(expected["grads"], found["grads"], 1e-5)
    assert_all_close(expected["buffers"], found["buffers"], 1e-5)
    assert set(batchnorm_counts(found["buffers"]).values()) == {4}  # two steps, two views each


def _ddp_worker(rank, world_size, init_file, batch, model, out_dir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    shard = {key: value[rank: rank + 1] for key, value in batch.items()}
    results = {}
    for granularity in ("off", "block"):
        results[granularity] = engine_step(config("RUNTIME.ACTIVATION_CHECKPOINTING", granularity),
                                           copy.deepcopy(model), shard, out_dir, seed=11 + rank,
                                           trainer_args={"rank": rank, "world_size": world_size})
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_two_processes_float64(start, tmp_path):
    """Each of two gloo processes takes the plain and the checkpointed step on its own image, DropPath and BN in
    train mode: the all-reduced gradients, each process's BN statistics and losses are the plain ones."""
    model, batch = start
    # fork: the workers inherit the imported modules (a spawned worker spends seconds importing torch and timm);
    # each sets one thread before its first operation
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), batch, model, str(tmp_path)), nprocs=2,
                       join=True, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    for results in ranks:
        assert_engine_steps_equal(results["off"], results["block"], 1e-10)
    # the gradients were all-reduced: both processes hold the same, though their images and draws differ
    assert_all_close(ranks[0]["block"]["grads"], ranks[1]["block"]["grads"], 1e-12)
    assert abs(ranks[0]["block"]["loss"] - ranks[1]["block"]["loss"]) > 1e-6
