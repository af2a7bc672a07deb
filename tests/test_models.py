"""The models against the official MPC reference (tests/fixtures), plus the DropPath and timm HRNet contracts."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import models
from models.hrformer import HRFORMER_CONFIGS, DropPath, relative_position_index
from official_fill import FIXTURES, fill_official, load_manifest

torch.set_num_threads(1)  # the test machine is small and shared

OFFICIAL_VALUES = 45_356_639


def relative_error(out: torch.Tensor, ref: np.ndarray) -> float:
    return float(np.linalg.norm(out.detach().numpy() - ref) / np.linalg.norm(ref))


@pytest.fixture(scope="module")
def manifest():
    return load_manifest()


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(FIXTURES / "mpc_reference.npz"))


@pytest.fixture(scope="module")
def official_model(manifest):
    model = models.build_stage2_model("hrt_base", "catnet")
    fill_official(model, manifest)
    return model.eval()


@pytest.fixture(scope="module")
def official_outputs(official_model, reference):
    x = torch.from_numpy(reference["input"])
    with torch.no_grad():
        maps = official_model.encoder(x)
        logits = official_model(x)
    return maps, logits


def test_state_dict_matches_official_manifest(official_model, manifest):
    ours = official_model.state_dict()
    assert list(ours) == [e["key"] for e in manifest]
    for e in manifest:
        assert list(ours[e["key"]].shape) == e["shape"], e["key"]
        assert str(ours[e["key"]].dtype).removeprefix("torch.") == e["dtype"], e["key"]
    assert sum(t.numel() for t in ours.values()) == OFFICIAL_VALUES
    assert sum(math.prod(e["shape"]) for e in manifest) == OFFICIAL_VALUES


def test_projections_match_official(official_outputs, reference):
    maps, _ = official_outputs
    for i, out in enumerate(maps):
        assert out.shape == reference[f"proj{i}"].shape
        assert relative_error(out, reference[f"proj{i}"]) < 1e-4, f"proj{i}"


def test_logits_match_official(official_outputs, reference):
    _, logits = official_outputs
    assert logits.shape == reference["logits"].shape == (1, 1, 24, 40)
    assert relative_error(logits, reference["logits"]) < 1e-4


def test_official_checkpoint_file_reproduces_reference(official_model, reference, tmp_path):
    """A bare state_dict written by torch.save, as the official release is, loads into a fresh model."""
    path = tmp_path / "official_stage2.pth"
    official_weights = official_model.state_dict()
    torch.save(official_weights, path)
    model = models.build_stage2_model("hrt_base", "catnet")
    report = models.load_checkpoint(model, path)
    assert (report.missing, report.unexpected, report.mismatched) == ([], [], [])
    assert len(report.loaded) == len(official_weights)
    with torch.no_grad():
        logits = model.eval()(torch.from_numpy(reference["input"]))
    assert relative_error(logits, reference["logits"]) < 1e-4


def test_stage1_model_is_the_projection_maps_normalised(official_model, official_outputs, reference):
    stage1 = models.Stage1Model(official_model.encoder, normalize=True).eval()
    with torch.no_grad():
        maps = stage1(torch.from_numpy(reference["input"]))
    for i, out in enumerate(maps):
        ref = reference[f"proj{i}"]
        norms = np.linalg.norm(ref, axis=1, keepdims=True)
        assert torch.allclose(out.norm(dim=1)[norms[:, 0] > 0], torch.ones(1), atol=1e-5)
        assert relative_error(out, ref / np.maximum(norms, 1e-12)) < 1e-4


def test_stage2_features_concatenate_upsampled_maps(official_model, official_outputs, reference):
    maps, _ = official_outputs
    with torch.no_grad():
        features = official_model.features(torch.from_numpy(reference["input"]))
    assert features.shape == (1, 1024, 24, 40)
    assert torch.allclose(features[:, :256], maps[0], atol=1e-6)
    # Hand-check align_corners=True on the coarsest map: the four corners are copied exactly.
    coarse = maps[3]
    block = features[:, 768:]
    for r, c, rr, cc in [(0, 0, 0, 0), (0, -1, 0, -1), (-1, 0, -1, 0), (-1, -1, -1, -1)]:
        assert torch.allclose(block[0, :, r, c], coarse[0, :, rr, cc], atol=1e-6)


def test_relative_position_index_by_hand():
    # Window 2: tokens (0,0), (0,1), (1,0), (1,1); index = (dr + 1) * 3 + (dc + 1).
    expected = torch.tensor([[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]])
    assert torch.equal(relative_position_index(2), expected)
    w = 7
    naive = torch.tensor(
        [[(r1 - r2 + w - 1) * (2 * w - 1) + (c1 - c2 + w - 1) for r2 in range(w) for c2 in range(w)]
         for r1 in range(w) for c1 in range(w)]
    )
    assert torch.equal(relative_position_index(w), naive)


def test_drop_path_schedule_equals_official(official_model):
    """Official: linspace(0, 0.2, 14); module m of a stage takes the next 2 values, shared by its branches."""
    schedule = np.linspace(0.0, 0.2, 14)
    expected = {}
    position = 0
    for stage, modules, branches in [(2, 1, 2), (3, 4, 3), (4, 2, 4)]:
        for m in range(modules):
            for b in range(branches):
                for k in range(2):
                    expected[f"stage{stage}.{m}.branches.{b}.{k}"] = schedule[position + k]
            position += 2
    rates = dict(official_model.encoder.drop_path_rates())
    assert rates.keys() == expected.keys()
    for name, rate in expected.items():
        assert rates[name] == pytest.approx(rate, abs=1e-7), name


def test_drop_path_is_per_sample_and_rescaled():
    torch.manual_seed(0)
    layer = DropPath(0.25).train()
    out = layer(torch.ones(4000, 3, 2))
    per_sample = out.reshape(4000, -1)
    kept = per_sample[:, 0] != 0
    assert torch.all(per_sample[kept] == 1 / 0.75) and torch.all(per_sample[~kept] == 0)
    assert abs(kept.float().mean().item() - 0.75) < 0.03
    assert torch.equal(layer.eval()(torch.ones(5, 3)), torch.ones(5, 3))


def _two_passes(model, x, train: bool):
    model.train(train)
    with torch.no_grad():
        return model(x), model(x)


def test_hrformer_train_passes_differ_eval_passes_equal():
    torch.manual_seed(0)
    model = models.build_stage1_model("hrt_nano", drop_path_rate=0.5, normalize=False)
    x = torch.rand(2, 3, 64, 96)
    first, second = _two_passes(model, x, train=True)
    assert any(not torch.allclose(a, b) for a, b in zip(first, second))
    first, second = _two_passes(model, x, train=False)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_timm_hrnet_contract_and_views():
    torch.manual_seed(0)
    model = models.build_stage1_model("hrnet_w18", drop_path_rate=0.1, normalize=False)
    x = torch.rand(2, 3, 64, 96)
    first, second = _two_passes(model, x, train=True)
    assert [tuple(m.shape) for m in first] == [(2, 256, 64 // s, 96 // s) for s in (4, 8, 16, 32)]
    assert any(not torch.allclose(a, b) for a, b in zip(first, second))
    first, second = _two_passes(model, x, train=False)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    logits = models.build_stage2_model("hrnet_w18").eval()(x)
    assert logits.shape == (2, 1, 16, 24)


@pytest.mark.parametrize(
    "head, convs",
    [("catnet", {2: (512, 1024), 5: (256, 512), 8: (128, 256), 11: (1, 128)}),
     ("casiav2", {2: (512, 1024), 5: (256, 512), 8: (128, 256), 11: (64, 128), 14: (1, 64)})],
)
def test_head_layout(head, convs):
    state = models.build_head(head).state_dict()
    conv_weights = {int(k.split(".")[1]): tuple(v.shape[:2]) for k, v in state.items() if v.ndim == 4}
    assert conv_weights == convs
    batch_norms = {int(k.split(".")[1]) for k in state if k.endswith("running_var")}
    assert batch_norms == {0} | {i + 1 for i in convs if i != max(convs)}


def test_head_computes_bn_relu_conv_chain():
    torch.manual_seed(0)
    head = models.build_head("catnet", in_channels=8).eval()
    for module in head.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 8, 3, 5)
    layers = list(head.classifier)
    y = F.relu(F.batch_norm(x, layers[0].running_mean, layers[0].running_var, layers[0].weight, layers[0].bias))
    for conv_index in (2, 5, 8):
        conv, bn = layers[conv_index], layers[conv_index + 1]
        z = torch.einsum("oi,bihw->bohw", conv.weight[:, :, 0, 0], y) + conv.bias[None, :, None, None]
        y = F.relu((z - bn.running_mean[None, :, None, None]) / torch.sqrt(bn.running_var[None, :, None, None] + bn.eps)
                   * bn.weight[None, :, None, None] + bn.bias[None, :, None, None])
    last = layers[11]
    expected = torch.einsum("oi,bihw->bohw", last.weight[:, :, 0, 0], y) + last.bias[None, :, None, None]
    assert torch.allclose(head(x), expected, atol=1e-5)


def test_registry_of_names():
    assert {"hrt_base", "hrt_small", "hrt_tiny", "hrt_nano", "hrnet_w18", "hrnet_w32", "hrnet_w48"} <= set(models.BACKBONES)
    assert set(models.HEADS) == {"catnet", "casiav2"}
    with pytest.raises(ValueError, match="unknown backbone"):
        models.build_stage1_model("resnet50")
    with pytest.raises(ValueError, match="unknown head"):
        models.build_stage2_model("hrt_nano", head="unet")


@pytest.mark.parametrize("name, widths, heads, modules", [
    ("hrt_small", (32, 64, 128, 256), (1, 2, 4, 8), (1, 4, 2)),
    ("hrt_tiny", (18, 36, 72, 144), (1, 2, 4, 8), (1, 3, 2)),
])
def test_published_hrformer_configs(name, widths, heads, modules):
    """HRFormer-S/-T as published in HRFormer's cls/configs/hrt/*.yaml."""
    stages = HRFORMER_CONFIGS[name].stages
    assert [s.widths for s in stages] == [widths[:2], widths[:3], widths]
    assert [s.heads for s in stages] == [heads[:2], heads[:3], heads]
    assert [s.num_modules for s in stages] == list(modules)


def test_odd_input_sizes_follow_the_stride_two_chain():
    """Sizes that are not multiples of 32 (or of the window) still give aligned maps at ceil(n / stride)."""
    model = models.build_stage2_model("hrt_nano").eval()
    with torch.no_grad():
        maps = model.encoder(torch.rand(1, 3, 100, 130))
        logits = model(torch.rand(1, 3, 100, 130))
    assert [tuple(m.shape[-2:]) for m in maps] == [(25, 33), (13, 17), (7, 9), (4, 5)]
    assert logits.shape == (1, 1, 25, 33)
