"""Exports (stage2/export.py, models/export.py): the ONNX model against the PyTorch model it came from, the
safetensors release bit for bit, both through the loaders and the registry, bad files named, outputs never clobbered.

One ONNX export per module (hrt_nano, about 8 s on two cores); every other test reuses it."""
import hashlib
import json

import numpy as np
import pytest
import safetensors.torch
import torch
from tiny_weights import save_tiny_weights

import models
from models import CheckpointError, load_checkpoint, load_trained_model, read_checkpoint
from models import export as export_module
from models import registry
from models.checkpoint import SAFETENSORS_FORMAT, safetensors_metadata
from models.export import ExportError, OnnxCheck, export_onnx, export_safetensors
from stage2 import export as export_script
from utils.entry import run_script

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Our checkpoint (hrt_nano + catnet, with its config) and an official-style bare state_dict (casiav2)."""
    return save_tiny_weights(tmp_path_factory.mktemp("weights"), "ours.pth", 0, "official_style.pth", 1)


@pytest.fixture(scope="module")
def exported_onnx(weights, tmp_path_factory):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    out = tmp_path_factory.mktemp("onnx") / "ours.onnx"
    checks = export_onnx(weights["ours"][0], out, shapes=[(1, 3, 64, 64)], threads=1)
    return out, checks


@pytest.fixture(scope="module")
def onnx_trained(exported_onnx):
    from models.onnx_backend import load_onnx_model

    return load_onnx_model(exported_onnx[0], threads=1)


def independent_eval_logits(model, images):
    """The reference: the PyTorch model the weights were saved from, its plain eval forward."""
    with torch.no_grad():
        return model.eval()(images)


# --- ONNX ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2, 3, 128, 128), (1, 3, 192, 192), (1, 3, 256, 256), (1, 3, 128, 224)],
                         ids=lambda s: f"{s[0]}x{s[2]}x{s[3]}")
def test_onnx_runtime_matches_the_pytorch_model(onnx_trained, weights, shape):
    onnx_model = onnx_trained.model
    images = torch.rand(*shape, generator=torch.Generator().manual_seed(shape[2] + shape[3]))
    expected = independent_eval_logits(weights["ours"][1], images)
    found = onnx_model(images)
    assert found.shape == expected.shape == (shape[0], 1, shape[2] // 4, shape[3] // 4)
    assert found.dtype == torch.float32
    difference = (found - expected).abs().max().item()
    print(f"ONNX Runtime vs PyTorch at {shape}: max |Δ logit| {difference:.2e}")
    assert difference <= 1e-4
    assert expected.std() > 0.5  # logits that spread: the comparison means something


def test_onnx_export_reports_its_checks(exported_onnx):
    _, checks = exported_onnx
    assert [check.shape for check in checks] == [(1, 3, 64, 64)]
    assert checks[0].max_abs_difference <= 1e-4 and checks[0].max_abs_logit > 1
    assert OnnxCheck((1, 3, 64, 64), 2e-4, 0.5).within(1e-4) is False
    assert OnnxCheck((1, 3, 64, 64), 2e-4, 4.0).within(1e-4) is True  # tolerance per unit of the largest |logit|


def test_onnx_metadata_builds_the_trained_model(onnx_trained, weights):
    trained = onnx_trained
    original = load_trained_model(weights["ours"][0])
    assert (trained.backbone, trained.head) == ("hrt_nano", "catnet")
    assert trained.input_size() == original.input_size() and trained.input_size(96) == 96
    assert trained.config.dump() == original.config.dump()
    assert trained.model.size_multiple == 32 and trained.model.metadata["source"] == "ours.pth"
    with pytest.raises(ValueError, match="multiples of 32"):
        trained.model(torch.rand(1, 3, 100, 128))
    from models.onnx_backend import load_onnx_model

    with pytest.raises(CheckpointError, match="ours.onnx: --head casiav2 contradicts the model's metadata"):
        load_onnx_model(trained.weights, head="casiav2")


def test_a_failed_check_writes_nothing(exported_onnx, weights, tmp_path, monkeypatch):
    path, _ = exported_onnx
    monkeypatch.setattr(export_module, "onnx_model_bytes", lambda model, metadata: path.read_bytes())
    monkeypatch.setattr(export_module, "check_onnx_model",
                        lambda model, onnx_model, shapes: [OnnxCheck((1, 3, 64, 64), 0.5, 2.0)])
    out = tmp_path / "bad.onnx"
    with pytest.raises(ExportError, match=r"bad.onnx: not written: .*5.00e-01"):
        export_onnx(weights["ours"][0], out, shapes=[(1, 3, 64, 64)])
    assert list(tmp_path.iterdir()) == []


def test_bad_onnx_files_are_named(exported_onnx, weights, tmp_path):
    onnx = pytest.importorskip("onnx")
    from models.onnx_backend import load_onnx_model

    data = exported_onnx[0].read_bytes()
    (tmp_path / "truncated.onnx").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.onnx").write_bytes(b"not a protobuf at all" * 10)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "foreign",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3, 8, 8])])
    onnx.save(onnx.helper.make_model(graph), tmp_path / "foreign.onnx")
    for name, problem in (("truncated.onnx", "not an ONNX model, or truncated or corrupt"),
                          ("garbage.onnx", "not an ONNX model, or truncated or corrupt"),
                          ("foreign.onnx", "an ONNX model not exported by this project"),
                          ("missing.onnx", "file not found")):
        with pytest.raises(CheckpointError, match=f"{name}: {problem}"):
            load_onnx_model(tmp_path / name)
    with pytest.raises(CheckpointError, match="ours.onnx: an ONNX model, not PyTorch weights"):
        load_trained_model(exported_onnx[0])


# --- safetensors ---------------------------------------------------------------------------------------------------

def test_safetensors_round_trip_is_bit_identical(weights, tmp_path):
    path, _ = weights["ours"]
    out = export_safetensors(path, tmp_path / "ours.safetensors")
    original = torch.load(path, weights_only=True)["model"]
    raw = safetensors.torch.load_file(out)  # the file itself, read by the safetensors library alone
    assert raw.keys() == original.keys()
    for key, tensor in original.items():
        assert raw[key].dtype == tensor.dtype and torch.equal(raw[key], tensor), key
    metadata = safetensors_metadata(out)
    assert metadata["format"] == SAFETENSORS_FORMAT and metadata["format_version"] == "1"
    assert (metadata["backbone"], metadata["head"], metadata["stage"]) == ("hrt_nano", "catnet", "2")
    assert metadata["config"] == load_trained_model(path).config.dump()

    contents = read_checkpoint(out)
    assert contents["format"] == models.OUR_FORMAT and contents["stage"] == 2
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(load_trained_model(out).model(images), load_trained_model(path).model(images))
    fresh = models.build_stage2_model("hrt_nano", "catnet")
    report = load_checkpoint(fresh, out)
    assert not report.missing and not report.mismatched
    loaded = fresh.state_dict()
    assert all(torch.equal(loaded[k], original[k]) for k in original)


def test_official_weights_keep_their_backbone_in_safetensors(weights, tmp_path):
    path, model = weights["official"]
    out = export_safetensors(path, tmp_path / "official.safetensors", backbone="hrt_nano")
    assert "config" not in safetensors_metadata(out)
    contents = read_checkpoint(out)
    assert "format" not in contents and all(torch.equal(contents[k], v) for k, v in model.state_dict().items())
    trained = load_trained_model(out)  # no --backbone: the metadata names it
    assert (trained.backbone, trained.head, trained.config) == ("hrt_nano", "casiav2", None)
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(trained.model(images), independent_eval_logits(model, images))
    with pytest.raises(CheckpointError, match="official.safetensors: --backbone hrt_base contradicts"):
        load_trained_model(out, backbone="hrt_base")


def test_safetensors_without_the_extension_is_recognised(weights, tmp_path):
    out = export_safetensors(weights["ours"][0], tmp_path / "ours.safetensors")
    renamed = tmp_path / "ours.bin"
    renamed.write_bytes(out.read_bytes())
    assert read_checkpoint(renamed)["format"] == models.OUR_FORMAT
    assert read_checkpoint(weights["ours"][0])["format"] == models.OUR_FORMAT  # a torch zip is not mistaken


def test_bad_safetensors_files_are_named(weights, tmp_path):
    out = export_safetensors(weights["ours"][0], tmp_path / "ours.safetensors")
    data = out.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[:-100])
    (tmp_path / "cut_header.safetensors").write_bytes(data[:4])
    (tmp_path / "garbage.safetensors").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    length = int.from_bytes(data[:8], "little")
    broken = bytearray(data)
    broken[8 + length // 2] = 0xFF  # inside the JSON header
    (tmp_path / "broken_header.safetensors").write_bytes(bytes(broken))
    header = json.loads(data[8:8 + length])
    header["__metadata__"]["format_version"] = "99"
    text = json.dumps(header).encode()
    (tmp_path / "newer.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + data[8 + length:])
    safetensors.torch.save_file({"embeddings.weight": torch.ones(4, 2)}, tmp_path / "foreign.safetensors")
    for name, problem in (("truncated.safetensors", "not a safetensors file, or truncated or corrupt"),
                          ("cut_header.safetensors", "not a safetensors file: 4 bytes, shorter than the 8-byte header"),
                          ("garbage.safetensors", "not a safetensors file, or truncated"),
                          ("broken_header.safetensors", "not a safetensors file, or corrupt"),
                          ("newer.safetensors", "written by a newer version of this project"),
                          ("foreign.safetensors", "holds no localization head")):
        with pytest.raises(CheckpointError, match=f"{name}: {problem}"):
            load_trained_model(tmp_path / name)


@pytest.fixture
def registry_of(tmp_path, monkeypatch):
    """Make a registry naming one file with the given content's size and digest."""
    def make(file_name: str, content: bytes):
        entries = [{"name": "release", "file": file_name, "bytes": len(content),
                    "sha256": hashlib.sha256(content).hexdigest(), "urls": ["https://example.org/x"],
                    "source": "example"}]
        path = tmp_path / "registry.json"
        path.write_text(json.dumps({"format_version": 1, "weights": entries}))
        monkeypatch.setattr(registry, "REGISTRY_PATH", path)
    return make


def test_the_registry_verifies_a_safetensors_release(weights, tmp_path, registry_of):
    release = export_safetensors(weights["ours"][0], tmp_path / "release.safetensors")
    registry_of("release.safetensors", release.read_bytes())
    assert models.verify_weights(release)["name"] == "release"
    assert load_trained_model(release).head == "catnet"
    content = release.read_bytes()
    registry_of("release.safetensors", content[:-1] + bytes([content[-1] ^ 1]))  # same size, another digest
    with pytest.raises(CheckpointError, match="release.safetensors: registered as 'release', expected"):
        load_trained_model(release)


# --- the script ----------------------------------------------------------------------------------------------------

def test_the_script_writes_safetensors_and_refuses_to_clobber(weights, tmp_path, capsys):
    out = tmp_path / "release.safetensors"
    export_script.main(["--weights", str(weights["ours"][0]), "--format", "safetensors", "--out", str(out)])
    assert f"wrote {out}" in capsys.readouterr().out
    written = out.read_bytes()
    for fmt, target in (("safetensors", out), ("onnx", tmp_path / "release.onnx")):
        target.write_bytes(written)
        with pytest.raises(SystemExit) as stop:
            run_script(export_script.main, ["--weights", str(weights["ours"][0]), "--format", fmt,
                                            "--out", str(target)])
        assert stop.value.code == 2
        assert capsys.readouterr().err.strip() == f"error: {target}: exists; pass --force to replace it"
        assert target.read_bytes() == written
    metadata = safetensors_metadata(out)
    export_script.main(["--weights", str(weights["ours"][0]), "--format", "safetensors", "--out", str(out),
                        "--force"])
    again = safetensors.torch.load(out.read_bytes())  # the same release, written again (the header's key order
    first = safetensors.torch.load(written)            # is the safetensors library's: compare the contents)
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)
    assert safetensors_metadata(out) == metadata
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release.onnx", "release.safetensors"]  # no temporaries


@pytest.mark.parametrize("argv,problem", [
    (["--format", "onnx", "--out", "x.safetensors"], "--format onnx writes a .onnx file"),
    (["--format", "onnx", "--out", "x.onnx", "--check-sizes", "100"], "--check-sizes 100: height and width must"),
    (["--format", "safetensors", "--out", "x.safetensors", "--weights", "missing.pth"], "missing.pth: file not found"),
])
def test_the_script_names_bad_arguments(weights, tmp_path, monkeypatch, capsys, argv, problem):
    monkeypatch.chdir(tmp_path)
    given = argv if "--weights" in argv else ["--weights", str(weights["ours"][0]), *argv]
    with pytest.raises(SystemExit) as stop:
        run_script(export_script.main, given)
    assert stop.value.code == 2 and problem in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_check_sizes_parse():
    assert export_script.check_shapes(["64", "96x128"]) == [(2, 3, 64, 64), (1, 3, 96, 128)]
    assert export_module.default_check_shapes(512) == [(2, 3, 256, 256), (1, 3, 512, 512), (1, 3, 512, 768)]
    assert export_module.default_check_shapes(100) == [(2, 3, 64, 64), (1, 3, 96, 96), (1, 3, 96, 160)]
    assert np.all(np.array(export_module.default_check_shapes(128))[:, 2:] % 32 == 0)


# --- inference with the ONNX Runtime backend -----------------------------------------------------------------------

@pytest.mark.parametrize("resolution", [["--input-size", "64"], ["--resolution", "native"]], ids=["protocol", "native"])
def test_infer_with_onnxruntime_gives_the_pytorch_maps(exported_onnx, weights, tmp_path, resolution):
    from PIL import Image

    from stage2 import infer

    rng = np.random.default_rng(0)
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 256, (64, 40, 3), dtype=np.uint8)).save(folder / "b.png")
    common = ["--input", str(folder), "--device", "cpu", "--num-workers", "0", "--no-progress", "--save-prob",
              *resolution]
    infer.main([*common, "--weights", str(exported_onnx[0]), "--backend", "onnxruntime", "--out", str(tmp_path / "o")])
    infer.main([*common, "--weights", str(weights["ours"][0]), "--plain", "--out", str(tmp_path / "p")])
    for name in ("a", "b"):
        onnx_prob = np.load(tmp_path / "o" / f"{name}_prob.npy")
        torch_prob = np.load(tmp_path / "p" / f"{name}_prob.npy")
        assert onnx_prob.shape == torch_prob.shape and np.abs(onnx_prob - torch_prob).max() <= 1e-5
        assert onnx_prob.std() > 0.01


def test_infer_with_onnxruntime_names_a_size_it_cannot_take(exported_onnx, tmp_path, capsys):
    from PIL import Image

    from stage2 import infer

    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(SystemExit) as stop:
        run_script(infer.command, ["--input", str(tmp_path / "a.png"), "--weights", str(exported_onnx[0]),
                                   "--backend", "onnxruntime", "--input-size", "100", "--out", str(tmp_path / "o"),
                                   "--num-workers", "0", "--no-progress"])
    assert stop.value.code == 2
    assert "ours.onnx: height and width must be multiples of 32" in capsys.readouterr().err


def test_test_script_scores_an_onnx_model_as_the_pytorch_weights(exported_onnx, weights, tmp_path):
    """stage2/test.py --backend onnxruntime: the same images, per-image rows and metrics as the PyTorch weights it
    was exported from (maps within 1e-5; the metrics' thresholds may move a pixel at most), batches included."""
    from PIL import Image

    from stage2 import test as test_script

    rng = np.random.default_rng(1)
    rows = []
    for index, (height, width) in enumerate([(70, 90), (64, 40), (48, 48)]):
        image, mask = tmp_path / f"{index}.png", tmp_path / f"{index}_gt.png"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(image)
        Image.fromarray((rng.random((height, width)) < 0.3).astype(np.uint8) * 255).save(mask)
        rows.append((str(image), str(mask)))
    list_path = tmp_path / "three_3.npy"
    np.save(list_path, np.array(rows))
    common = ["--flist", str(list_path), "--device", "cpu", "--num-workers", "0", "--no-progress", "--save-prob",
              "--input-size", "64"]
    onnx = test_script.main([*common, "--weights", str(exported_onnx[0]), "--backend", "onnxruntime",
                             "--batch-size", "2", "--out", str(tmp_path / "o")])
    torch_report = test_script.main([*common, "--weights", str(weights["ours"][0]), "--out", str(tmp_path / "p")])
    for index in range(3):
        onnx_prob = np.load(tmp_path / "o" / "three_3" / "prob" / f"{index}.npy")
        torch_prob = np.load(tmp_path / "p" / "three_3" / "prob" / f"{index}.npy")
        assert onnx_prob.shape == torch_prob.shape and np.abs(onnx_prob - torch_prob).max() <= 1e-5
        assert onnx_prob.std() > 0.01
    for key in ("auc_mean", "auc_pooled"):
        assert onnx["datasets"]["three_3"][key] == pytest.approx(torch_report["datasets"]["three_3"][key], abs=1e-4)
    assert onnx["datasets"]["three_3"]["n_tampered"] == 3
    with pytest.raises(SystemExit, match="--fast is PyTorch's"):
        test_script.main([*common, "--weights", str(exported_onnx[0]), "--backend", "onnxruntime", "--fast",
                          "--out", str(tmp_path / "f")])
    assert not (tmp_path / "f").exists()
