"""load_checkpoint: every accepted format, the required-ness rule, and clear errors for bad files.

Uses hrt_nano for speed; the official hrt_base round trip against the reference lives in test_models.py.
"""
import pickle

import pytest
import torch

import models
from models import CheckpointError, load_checkpoint

torch.set_num_threads(1)

HEAD_KEYS = ("decoder.classifier.11.weight", "decoder.classifier.2.weight")


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Give every float tensor distinctive values so that a load that misses one is visible."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            values = torch.rand(tensor.shape, generator=generator)
            tensor.copy_(values + 0.5 if name.endswith("running_var") else values * 0.2 - 0.1)


def _fresh_stage2():
    return models.build_stage2_model("hrt_nano", "catnet", drop_path_rate=0.0)


def _fresh_stage1():
    return models.build_stage1_model("hrt_nano", drop_path_rate=0.0, normalize=True)


@pytest.fixture(scope="module")
def source():
    model = _fresh_stage2()
    _randomise(model, seed=1)
    return model.eval()


@pytest.fixture(scope="module")
def image():
    return torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(2))


def _logits(model, image):
    with torch.no_grad():
        return model.eval()(image)


def _save(obj, path):
    torch.save(obj, path)
    return path


def test_official_stage2_state_dict(source, image, tmp_path):
    path = _save(source.state_dict(), tmp_path / "stage2.pth")
    model = _fresh_stage2()
    report = load_checkpoint(model, path)
    assert report.source_format == "state_dict"
    assert (report.missing, report.unexpected, report.mismatched) == ([], [], [])
    assert torch.equal(_logits(model, image), _logits(source, image))
    assert str(path) in report.summary()


def test_stage1_backbone_without_prefix_into_stage1_model(source, image, tmp_path):
    bare = {k.removeprefix("encoder."): v for k, v in source.state_dict().items() if k.startswith("encoder.")}
    path = _save(bare, tmp_path / "stage1.pth")
    model = _fresh_stage1()
    report = load_checkpoint(model, path)
    assert report.missing == [] and report.unexpected == []
    with torch.no_grad():
        ours = model.eval()(image)
        expected = [torch.nn.functional.normalize(m, dim=1) for m in source.encoder(image)]
    assert all(torch.equal(a, b) for a, b in zip(ours, expected))


def test_stage1_backbone_into_stage2_needs_require_encoder(source, tmp_path):
    bare = {k.removeprefix("encoder."): v for k, v in source.state_dict().items() if k.startswith("encoder.")}
    path = _save(bare, tmp_path / "stage1.pth")
    with pytest.raises(CheckpointError, match="decoder.classifier"):
        load_checkpoint(_fresh_stage2(), path)
    model = _fresh_stage2()
    report = load_checkpoint(model, path, require=("encoder",))
    assert report.missing and all(k.startswith("decoder.") for k in report.missing)
    assert torch.equal(model.encoder.conv1.weight, source.encoder.conv1.weight)


def test_stage2_file_into_bare_backbone_strips_encoder(source):
    backbone = models.build_backbone("hrt_nano", drop_path_rate=0.0)
    report = load_checkpoint(backbone, source.state_dict())
    assert report.missing == []
    assert report.unexpected and all(k.startswith("decoder.") for k in report.unexpected)
    assert torch.equal(backbone.convs[3].conv.weight, source.encoder.convs[3].conv.weight)


def test_ddp_module_prefix(source, image, tmp_path):
    path = _save({"module." + k: v for k, v in source.state_dict().items()}, tmp_path / "ddp.pth")
    model = _fresh_stage2()
    report = load_checkpoint(model, path)
    assert report.missing == [] and "module." in report.source_format
    assert torch.equal(_logits(model, image), _logits(source, image))


def test_our_training_checkpoint(source, image, tmp_path):
    checkpoint = {
        "format": models.OUR_FORMAT,
        "model": source.state_dict(),
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
        "config": {"MODEL": {"BACKBONE": "hrt_nano"}},
        "step": 7,
    }
    model = _fresh_stage2()
    report = load_checkpoint(model, _save(checkpoint, tmp_path / "ours.pth"))
    assert report.source_format == models.OUR_FORMAT and report.missing == []
    assert torch.equal(_logits(model, image), _logits(source, image))


def test_imagenet_checkpoint_is_partial_and_reported(source, tmp_path):
    backbone_state = {k.removeprefix("encoder."): v for k, v in source.state_dict().items() if k.startswith("encoder.")}
    classification = {k: v for k, v in backbone_state.items() if not k.startswith("convs.")}
    classification["classifier.weight"] = torch.zeros(1000, 2048)
    classification["final_layer.0.weight"] = torch.zeros(2048, 1024, 1, 1)
    checkpoint = {"model": classification, "optimizer": {"state": {}}, "epoch": 300}
    model = _fresh_stage1()
    projections_before = {k: v.clone() for k, v in model.encoder.convs.state_dict().items()}
    report = load_checkpoint(model, _save(checkpoint, tmp_path / "imagenet.pth"))
    assert report.source_format.startswith("hrformer-imagenet")
    assert report.missing and all(k.startswith("encoder.convs.") for k in report.missing)
    assert sorted(report.unexpected) == ["classifier.weight", "final_layer.0.weight"]
    assert torch.equal(model.encoder.stage4[0].branches[3][1].mlp.fc2.weight, source.encoder.stage4[0].branches[3][1].mlp.fc2.weight)
    assert all(torch.equal(v, projections_before[k]) for k, v in model.encoder.convs.state_dict().items())


def test_imagenet_checkpoint_missing_a_backbone_tensor_is_an_error(source):
    state = {k.removeprefix("encoder."): v for k, v in source.state_dict().items() if k.startswith("encoder.")}
    del state["layer1.0.conv2.weight"]
    with pytest.raises(CheckpointError, match=r"encoder\.layer1\.0\.conv2\.weight"):
        load_checkpoint(_fresh_stage1(), {"model": state})


def test_missing_head_tensor_is_an_error_and_loads_nothing(source, tmp_path):
    state = source.state_dict()
    del state[HEAD_KEYS[0]]
    path = _save(state, tmp_path / "no_head.pth")
    model = _fresh_stage2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(model, path)
    message = str(error.value)
    assert str(path) in message and HEAD_KEYS[0] in message and "missing 1:" in message
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_mis_shaped_tensor_is_an_error(source, tmp_path):
    state = source.state_dict()
    state[HEAD_KEYS[1]] = torch.zeros(256, 1024, 1, 1)
    path = _save(state, tmp_path / "wrong_shape.pth")
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(_fresh_stage2(), path)
    message = str(error.value)
    assert str(path) in message and HEAD_KEYS[1] in message
    assert "expected [512, 1024, 1, 1], found [256, 1024, 1, 1]" in message


def test_casiav2_checkpoint_into_catnet_head_is_an_error(source):
    casiav2 = models.build_stage2_model("hrt_nano", "casiav2", drop_path_rate=0.0)
    with pytest.raises(CheckpointError, match=r"decoder\.classifier\.11\.weight \(expected \[1, 128, 1, 1\], found \[64, 128, 1, 1\]\)"):
        load_checkpoint(_fresh_stage2(), casiav2.state_dict())


def test_truncated_file(source, tmp_path):
    path = _save(source.state_dict(), tmp_path / "truncated.pth")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.pth.*truncated, corrupt"):
        load_checkpoint(_fresh_stage2(), path)


@pytest.mark.parametrize("header", [b"", b"\x80\x02"], ids=["raw", "pickle-header"])
def test_random_bytes(tmp_path, header):
    path = tmp_path / "random.pth"
    noise = torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    path.write_bytes(header + noise.numpy().tobytes())
    with pytest.raises(CheckpointError, match="random.pth: (not a PyTorch weights file|cannot be read)"):
        load_checkpoint(_fresh_stage2(), path)


class NotWeights:
    """A class whose pickle needs code to load."""

    def __init__(self):
        self.weights = torch.zeros(3)


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_pickle_that_needs_code(tmp_path, writer):
    path = tmp_path / f"custom_{writer}.pth"
    if writer == "torch":
        torch.save({"model": NotWeights()}, path)
    else:
        path.write_bytes(pickle.dumps(NotWeights(), protocol=2))
    with pytest.raises(CheckpointError, match=f"custom_{writer}.pth: holds Python objects that need code"):
        load_checkpoint(_fresh_stage2(), path)


@pytest.mark.parametrize("content, problem", [
    ([1, 2, 3], "not a state dict .*list"),
    ({"conv1.weight": [1.0, 2.0]}, "'conv1.weight' holds a list"),
    ({}, "holds no state dict"),
])
def test_foreign_content(tmp_path, content, problem):
    path = _save(content, tmp_path / "foreign.pth")
    with pytest.raises(CheckpointError, match=f"foreign.pth.*{problem}"):
        load_checkpoint(_fresh_stage2(), path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere.pth: file not found"):
        load_checkpoint(_fresh_stage2(), tmp_path / "nowhere.pth")


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_read_checkpoint_maps_zip_files_and_reads_legacy_ones(tmp_path, zip_format):
    """`read_checkpoint(mmap=True)` (what test.py and infer.py use) gives the saved tensors for both torch formats;
    the legacy format cannot be memory-mapped and is read normally."""
    saved = {"conv1.weight": torch.arange(24.0).reshape(2, 3, 2, 2), "step": 7}
    path = tmp_path / "weights.pth"
    torch.save(saved, path, _use_new_zipfile_serialization=zip_format)
    loaded = models.read_checkpoint(path, mmap=True)
    assert loaded["step"] == 7 and torch.equal(loaded["conv1.weight"], saved["conv1.weight"])
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="weights.pth: cannot be read .*truncated, corrupt"):
        models.read_checkpoint(path, mmap=True)


def test_require_names_unknown_part(source):
    with pytest.raises(ValueError, match="head"):
        load_checkpoint(_fresh_stage2(), source.state_dict(), require=("head",))


def test_build_stage1_model_loads_hrformer_imagenet_weights(source, tmp_path):
    state = {
        k.removeprefix("encoder."): v
        for k, v in source.state_dict().items()
        if k.startswith("encoder.") and not k.startswith("encoder.convs.")
    }
    path = _save({"model": state}, tmp_path / "hrt_nano_imagenet.pth")
    model = models.build_stage1_model("hrt_nano", pretrained_path=path)
    assert torch.equal(model.encoder.layer1[0].conv1.weight, source.encoder.layer1[0].conv1.weight)


def test_build_stage1_model_loads_timm_imagenet_weights(tmp_path):
    """timm's classification HRNet weights (extra head keys) load by name into the wrapper's timm body."""
    import timm

    torch.manual_seed(4)
    classifier = timm.create_model("hrnet_w18", pretrained=False)
    path = _save(classifier.state_dict(), tmp_path / "hrnet_w18_imagenet.pth")
    model = models.build_stage1_model("hrnet_w18", pretrained_path=path)
    key = "stage4.0.branches.0.0.conv1.weight"
    assert torch.equal(model.encoder.body.state_dict()[key], classifier.state_dict()[key])


# ---- derived buffers: relative_position_index is rebuilt from the window size, never taken on trust ----------------

DERIVED = "relative_position_index"


def _index_by_definition(window: int) -> torch.Tensor:
    """For a w×w window, index[i, j] = (dy + w - 1)(2w - 1) + (dx + w - 1), with (dy, dx) = position i - position j
    (positions numbered row by row): one bias-table row per relative offset."""
    tokens = window * window
    index = torch.empty(tokens, tokens, dtype=torch.int64)
    for i in range(tokens):
        for j in range(tokens):
            dy, dx = i // window - j // window, i % window - j % window
            index[i, j] = (dy + window - 1) * (2 * window - 1) + (dx + window - 1)
    return index


def _window_sizes(model: torch.nn.Module) -> dict[str, int]:
    """State-dict key of every window attention's index -> its window size."""
    return {f"{name}.{DERIVED}": module.window_size for name, module in model.named_modules()
            if hasattr(module, DERIVED)}


def test_relative_position_index_construction_matches_its_definition():
    for window in (1, 2, 3, 7):
        assert torch.equal(models.hrformer.relative_position_index(window), _index_by_definition(window)), window


@pytest.mark.parametrize("layout", ["official stage 2", "stage-1 backbone"])
def test_file_without_derived_buffers_loads_and_reports_them_rebuilt(source, image, layout):
    state = {k: v for k, v in source.state_dict().items() if not k.endswith(DERIVED)}
    if layout == "stage-1 backbone":  # bare backbone keys, as the official stage-1 files
        state = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
        model, reference = _fresh_stage1(), source.encoder
    else:
        model, reference = _fresh_stage2(), source
    report = load_checkpoint(model, state)
    windows = _window_sizes(model)
    assert len(windows) == 18  # every window attention of hrt_nano
    assert (report.missing, report.unexpected, report.mismatched) == ([], [], [])
    assert sorted(report.rebuilt) == sorted(windows)
    assert not set(report.rebuilt) & set(report.loaded)
    summary = report.summary()
    assert "rebuilt" in summary and "missing" not in summary and next(iter(windows)) in summary
    for key, window in windows.items():
        assert torch.equal(model.state_dict()[key], _index_by_definition(window)), key
    with torch.no_grad():
        ours = model.eval()(image)
        expected = reference(image) if layout == "official stage 2" else [
            torch.nn.functional.normalize(m, dim=1) for m in reference(image)]
    if layout == "official stage 2":
        assert torch.equal(ours, expected)
    else:
        assert all(torch.equal(a, b) for a, b in zip(ours, expected))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_file_with_the_constructed_derived_buffers_loads_them(source, dtype):
    state = {k: v.to(dtype) if k.endswith(DERIVED) else v for k, v in source.state_dict().items()}
    report = load_checkpoint(_fresh_stage2(), state)
    assert report.rebuilt == [] and report.missing == []
    assert set(_window_sizes(source)) <= set(report.loaded)


def test_file_whose_relative_position_index_differs_is_refused(source):
    """A different index means a file from code with another layout: its bias table is indexed by that index, so
    neither keeping ours nor taking it is safe. The load is refused and the model left untouched."""
    state = dict(source.state_dict())
    key = next(iter(_window_sizes(source)))
    state[key] = state[key].t().contiguous()  # the offsets with the opposite sign: same shape, same values, other places
    model = _fresh_stage2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="derived buffers differ") as error:
        load_checkpoint(model, state)
    assert key in str(error.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
