"""The weights registry: the published facts (docs/MPC_SPEC.md Appendix B) and verification of downloaded files."""
import hashlib
import json
import re

import pytest
import torch

import models
from models import CheckpointError, registry_entry_for, verify_weights
from models import registry

# Appendix B of docs/MPC_SPEC.md (Git LFS pointers in multimediaFor/MPC at f74f92b).
PUBLISHED = {
    "hrt_base.pth": (607_411_218, "5b62e5c08bcc2acfb9f5d1930ac9b278a7d0b26b538ddaf44b8aebc5d2edf900"),
    "MPC_CATNet_stage1_weights.pth": (179_812_573, "5a8a255239a4198b48ef7f0450d4b66d4c63f55d5be2aeb842c6ba14b0571140"),
    "MPC_CATNet_stage2_weights.pth": (182_674_234, "cda63e3e13bce33029cf6ac4ea4e38816996ec63d6ef76d580991ac6805045d3"),
    "MPC_CASIAv2_stage2_weights.pth": (None, None),
}


def test_registry_holds_the_published_facts():
    entries = registry.load_registry()
    assert len({e["name"] for e in entries}) == len(entries)
    assert len({e["file"] for e in entries}) == len(entries)
    for entry in entries:
        assert entry["licence"] and entry["source"] and entry["holds"]
        assert entry["sha256"] is None or re.fullmatch(r"[0-9a-f]{64}", entry["sha256"])
    for file, (size, digest) in PUBLISHED.items():
        entry = registry_entry_for(f"/anywhere/{file}")
        assert (entry["bytes"], entry["sha256"]) == (size, digest)
    assert "CC BY-NC 4.0" in registry_entry_for("MPC_CATNet_stage2_weights.pth")["licence"]
    assert "MIT" in registry_entry_for("hrt_base.pth")["licence"]


@pytest.fixture
def temporary_registry(tmp_path, monkeypatch):
    """A registry naming one small file, 'weights.pth', whose content is `payload`."""
    payload = b"0123456789"
    entries = [
        {"name": "small", "file": "weights.pth", "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest(),
         "urls": ["https://example.org/weights.pth"], "source": "example"},
        {"name": "unknown", "file": "unknown.pth", "bytes": None, "sha256": None, "urls": [], "source": "somewhere"},
    ]
    path = tmp_path / "registry.json"
    path.write_text(json.dumps({"format_version": 1, "weights": entries}))
    monkeypatch.setattr(registry, "REGISTRY_PATH", path)
    folder = tmp_path / "downloads"
    folder.mkdir()
    return folder, payload


def test_verify_accepts_the_registered_file(temporary_registry):
    folder, payload = temporary_registry
    (folder / "weights.pth").write_bytes(payload)
    assert verify_weights(folder / "weights.pth")["name"] == "small"


def test_verify_explains_a_wrong_size(temporary_registry):
    folder, payload = temporary_registry
    (folder / "weights.pth").write_bytes(payload[:7])
    with pytest.raises(CheckpointError) as error:
        verify_weights(folder / "weights.pth")
    message = str(error.value)
    assert "weights.pth" in message and "expected 10 bytes" in message and "found 7 bytes" in message
    assert "incomplete or is a different file" in message and "https://example.org/weights.pth" in message


def test_verify_explains_a_wrong_digest(temporary_registry):
    folder, payload = temporary_registry
    other = payload[::-1]
    (folder / "weights.pth").write_bytes(other)
    with pytest.raises(CheckpointError, match=f"found 10 bytes / sha256 {hashlib.sha256(other).hexdigest()}"):
        verify_weights(folder / "weights.pth")


def test_unknown_digest_and_unregistered_names_pass(temporary_registry):
    folder, _ = temporary_registry
    (folder / "unknown.pth").write_bytes(b"anything")
    (folder / "mine.pth").write_bytes(b"anything")
    assert verify_weights(folder / "unknown.pth")["name"] == "unknown"
    assert verify_weights(folder / "mine.pth") is None


def test_load_checkpoint_verifies_registered_files_first(temporary_registry):
    """A valid checkpoint under a registered name with the wrong size is refused before it is read."""
    folder, _ = temporary_registry
    model = models.build_stage2_model("hrt_nano")
    path = folder / "weights.pth"
    torch.save(model.state_dict(), path)
    with pytest.raises(CheckpointError, match="weights.pth: registered as 'small'"):
        models.load_checkpoint(model, path)


def test_unreadable_registry_is_an_error(tmp_path):
    broken = tmp_path / "registry.json"
    broken.write_text("{not json")
    with pytest.raises(CheckpointError, match="registry.json: not a readable weights registry"):
        registry.load_registry(broken)
