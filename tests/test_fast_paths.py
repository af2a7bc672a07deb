"""The fast paths compute what the plain model computes: fused window attention (models.hrformer) and the prepared
inference model (models.inference), against explicit re-computations, hand-composed layers and the plain forward."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import models
import models.hrformer as hrformer
from models.hrformer import WindowAttention
from models.inference import fold_batchnorm, fold_batchnorms, prepare_for_inference
from test_models import fill_official

REPO = Path(__file__).resolve().parents[1]
DEMO_WEIGHTS = REPO / "weights" / "mpc_demo_hrt_nano_stage2.pth"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def images(batch: int, height: int, width: int, seed: int) -> torch.Tensor:
    """Noise, and a flat image with a noisier square (what the demo model learnt to find): maps that spread."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, height, width, generator=generator)
    x[-1] = 0.4 + 0.2 * x[-1]
    x[-1, :, height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] += 0.08 * torch.randn(
        3, height - 2 * (height // 4), width - 2 * (width // 4), generator=generator)
    return x


# --- window attention: the fused kernel against the explicit softmax ---------------------------------------------

def explicit_window_attention(attention: WindowAttention, x: torch.Tensor) -> torch.Tensor:
    """The official computation written out: per head softmax(q kᵀ / √d + bias) v, then the output projection."""
    windows, tokens, dim = x.shape
    heads = attention.num_heads
    head_dim = dim // heads

    def per_head(t):
        return t.reshape(windows, tokens, heads, head_dim).transpose(1, 2)

    q = per_head(x @ attention.q_proj.weight.T + attention.q_proj.bias) / head_dim**0.5
    k = per_head(x @ attention.k_proj.weight.T + attention.k_proj.bias)
    v = per_head(x @ attention.v_proj.weight.T + attention.v_proj.bias)
    index = attention.relative_position_index
    bias = attention.relative_position_bias_table[index.reshape(-1)].reshape(tokens, tokens, heads).permute(2, 0, 1)
    out = torch.softmax(q @ k.transpose(-2, -1) + bias, dim=-1) @ v
    return out.transpose(1, 2).reshape(windows, tokens, dim) @ attention.out_proj.weight.T + attention.out_proj.bias


@pytest.fixture()
def attention():
    torch.manual_seed(0)
    module = WindowAttention(dim=24, num_heads=3, window_size=7)
    with torch.no_grad():
        module.relative_position_bias_table.normal_(0, 1.0)  # a bias that matters, unlike the 0.02 init
    return module


@pytest.fixture()
def fused_calls(monkeypatch):
    """Counts the calls of the fused kernel, so that a test knows which route ran."""
    calls = []
    kernel = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(hrformer.F, "scaled_dot_product_attention", counting)
    return calls


def test_fused_attention_without_bias_gradient_equals_explicit_softmax(attention, fused_calls):
    """Inference (no gradient) and a frozen bias table with gradients to the input both take the fused kernel;
    outputs and input/projection gradients equal the explicit softmax to 1e-6."""
    x = torch.randn(5, 49, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert relative(attention(x), explicit_window_attention(attention, x)) < 1e-6
    assert len(fused_calls) == 1

    attention.relative_position_bias_table.requires_grad_(False)
    upstream = torch.randn(5, 49, 24, generator=torch.Generator().manual_seed(2))
    results = []
    for forward in (attention, lambda t: explicit_window_attention(attention, t)):
        leaf = x.clone().requires_grad_()
        attention.zero_grad()
        out = forward(leaf)
        out.backward(upstream)
        results.append([out.detach(), leaf.grad, attention.q_proj.weight.grad.clone(), attention.v_proj.weight.grad.clone()])
    assert len(fused_calls) == 2
    for fused, explicit in zip(*results):
        assert relative(fused, explicit) < 1e-6


def test_training_route_gives_the_bias_table_its_gradient(attention, fused_calls):
    """With a trainable bias table (stage-1 training) the explicit softmax runs, and its bias-table gradient equals
    the explicit re-computation's (to rounding: the same order of operations)."""
    x = torch.randn(4, 49, 24, generator=torch.Generator().manual_seed(3))
    upstream = torch.randn(4, 49, 24, generator=torch.Generator().manual_seed(4))
    grads = []
    for forward in (attention, lambda t: explicit_window_attention(attention, t)):
        attention.zero_grad()
        forward(x).backward(upstream)
        grads.append(attention.relative_position_bias_table.grad.clone())
    assert fused_calls == []
    assert grads[0].abs().max() > 0
    assert relative(grads[0], grads[1]) < 1e-6


# --- BatchNorm folding -------------------------------------------------------------------------------------------

def random_batchnorm(channels: int, generator: torch.Generator, dtype=torch.float64) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels, eps=1e-3, dtype=dtype).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(channels, generator=generator, dtype=dtype))
        bn.running_var.copy_(0.2 + torch.rand(channels, generator=generator, dtype=dtype))
        bn.weight.copy_(1 + 0.5 * torch.randn(channels, generator=generator, dtype=dtype))
        bn.bias.copy_(torch.randn(channels, generator=generator, dtype=dtype))
    return bn


@pytest.mark.parametrize("groups, bias, stride", [(1, False, 1), (1, True, 2), (6, True, 1)])
def test_folded_convolution_equals_convolution_then_batchnorm(groups, bias, stride):
    generator = torch.Generator().manual_seed(groups + stride)
    conv = nn.Conv2d(6, 6, 3, stride, 1, groups=groups, bias=bias, dtype=torch.float64)
    bn = random_batchnorm(6, generator)
    x = torch.randn(2, 6, 9, 11, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        expected = bn(conv(x))
        folded = fold_batchnorm(conv, bn)
        assert relative(folded(x), expected) < 1e-13
        assert relative(bn(conv(x)), expected) == 0  # the originals are unchanged


def test_only_a_batchnorm_directly_after_a_convolution_is_folded():
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), random_batchnorm(4, generator, torch.float32),  # folded
        nn.ReLU(), random_batchnorm(4, generator, torch.float32),  # after a non-linearity: kept
        nn.Conv2d(4, 4, 1), nn.ReLU(), random_batchnorm(4, generator, torch.float32),  # not directly after: kept
    ).eval()
    x = torch.randn(2, 3, 5, 5, generator=generator)
    with torch.no_grad():
        expected = model(x)
        assert fold_batchnorms(model) == 1
        assert [type(m).__name__ for m in model] == ["Conv2d", "Identity", "ReLU", "BatchNorm2d", "Conv2d", "ReLU",
                                                     "BatchNorm2d"]
        assert relative(model(x), expected) < 1e-6


def test_prepared_hrt_nano_keeps_only_the_heads_input_batchnorm():
    """Every BN of HRFormer follows a convolution (stem, bottlenecks, transitions, fusion, FFN, projections) and so do
    the head's hidden BNs; the head's first BN follows the concatenation of the upsampled maps and stays."""
    model = models.build_stage2_model("hrt_nano", "catnet").eval()
    batchnorms = [name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    prepared = prepare_for_inference(model)
    left = [name for name, m in prepared.model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert left == ["decoder.classifier.0"]
    assert prepared.folded_batchnorms == len(batchnorms) - 1
    # hrt_nano: (1 + 1 + 1) modules × branches (2, 3, 4) × 2 blocks per branch
    assert prepared.fast_blocks == 2 * (2 + 3 + 4)


# --- the prepared model against the plain forward ----------------------------------------------------------------

def test_prepare_leaves_the_model_untouched():
    model = models.build_stage2_model("hrt_nano", "catnet").train()
    model.encoder.conv1.weight.requires_grad_(False)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    modules_before = [type(m) for m in model.modules()]
    prepare_for_inference(model)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items())
    assert [type(m) for m in model.modules()] == modules_before
    assert model.training and all(m.training for m in model.modules())
    assert not model.encoder.conv1.weight.requires_grad and model.encoder.conv2.weight.requires_grad


def assert_same_maps(model: nn.Module, prepared, x: torch.Tensor) -> None:
    """Probability maps equal to 1e-5; the logits too (relative), since a saturated sigmoid would hide a difference
    (the rule-filled HRT-B's logits lie around −10)."""
    with torch.no_grad():
        plain = model(x)
    fast = prepared(x)
    assert fast.dtype == torch.float32 and fast.shape == plain.shape
    assert plain.std() > 0.1  # logits that vary: the comparison is not between two constants
    assert (torch.sigmoid(fast) - torch.sigmoid(plain)).abs().max() <= 1e-5
    assert relative(fast, plain) <= 1e-5


@pytest.fixture(scope="module")
def demo_model():
    return models.load_trained_model(str(DEMO_WEIGHTS)).model


@pytest.mark.parametrize("options", [{}, {"channels_last": False}, {"fold_bn": False, "fast_blocks": False}])
def test_fast_path_maps_equal_plain_on_demo_weights(demo_model, options):
    prepared = prepare_for_inference(demo_model, **options)
    assert_same_maps(demo_model, prepared, images(2, 128, 128, seed=0))
    assert_same_maps(demo_model, prepared, images(1, 72, 100, seed=1))  # windows padded unevenly on every branch


def test_fast_path_maps_equal_plain_on_rule_filled_hrt_base():
    model = models.build_stage2_model("hrt_base", "catnet")
    fill_official(model, json.loads((FIXTURES / "mpc_state_dict_manifest.json").read_text()))
    model.eval()
    assert_same_maps(model, prepare_for_inference(model), images(2, 64, 64, seed=2))


@pytest.mark.parametrize("flag", ["compile", "bf16"])
def test_cuda_only_options_are_refused_on_the_cpu(flag):
    model = models.build_stage2_model("hrt_nano", "catnet")
    with pytest.raises(ValueError, match="CUDA"):
        prepare_for_inference(model, **{flag: True})
