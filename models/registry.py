"""The registry of released weights (``weights/registry.json``): look a file up by name and verify it."""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from .errors import CheckpointError

__all__ = ["REGISTRY_PATH", "load_registry", "registry_entry_for", "verify_weights"]

REGISTRY_PATH = Path(__file__).resolve().parents[1] / "weights" / "registry.json"
log = logging.getLogger(__name__)


def load_registry(registry_path: str | Path | None = None) -> list[dict]:
    """All entries of the registry file (default ``REGISTRY_PATH``): dicts with at least ``name`` and ``file``."""
    registry_path = REGISTRY_PATH if registry_path is None else registry_path
    try:
        data = json.loads(Path(registry_path).read_text())
        entries = data["weights"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{registry_path}: not a readable weights registry ({error})") from error
    for entry in entries:
        if not {"name", "file"} <= set(entry):
            raise CheckpointError(f"{registry_path}: entry {entry!r} lacks 'name' or 'file'")
    return entries


def registry_entry_for(path: str | Path, registry_path: str | Path | None = None) -> dict | None:
    """The registry entry whose ``file`` equals the file name of ``path``, or None if it is not registered."""
    name = Path(path).name
    return next((entry for entry in load_registry(registry_path) if entry["file"] == name), None)


def sha256_of(path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def verify_weights(path: str | Path, registry_path: str | Path | None = None) -> dict | None:
    """Check a registered file's size, then its sha256; return its entry (None if unregistered).

    Raises ``CheckpointError`` explaining what differs and where to get the right file.
    """
    path = Path(path)
    entry = registry_entry_for(path, registry_path)
    if entry is None:
        return None
    expected_bytes, expected_sha = entry.get("bytes"), entry.get("sha256")
    if expected_bytes is None or expected_sha is None:
        log.info("%s: registered as %r but its size/digest are unknown; not verified", path, entry["name"])
        return entry
    found_bytes = path.stat().st_size
    found_sha = sha256_of(path) if found_bytes == expected_bytes else None
    if found_bytes == expected_bytes and found_sha == expected_sha:
        return entry
    found = f"{found_bytes:,} bytes" + (f" / sha256 {found_sha}" if found_sha else "")
    where = "; ".join(entry.get("urls") or []) or entry.get("source", "the registry's source")
    raise CheckpointError(
        f"{path}: registered as {entry['name']!r}, expected {expected_bytes:,} bytes / sha256 {expected_sha}, "
        f"found {found}: the download is incomplete or is a different file; get it from {where}"
    )
