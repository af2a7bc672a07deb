"""Install requirements-app.txt (the viewer's gradio, the browser test's selenium) without touching the core packages.

    python stage2/install_app.py [requirements-app.txt]

The core packages the model runs on (torch, torchvision, numpy, pillow, opencv) stay at the versions installed:
they are passed to pip as constraints. A plain `pip install -c core.txt gradio` is not enough: every gradio 6
release declares `pillow<13`, so with pillow 13 pip backtracks to gradio 3.36 (years old, broken with today's
pydantic). Gradio's use of Pillow (saving and converting images) works with pillow 13 (the browser test checks it),
so a package of the file whose newest matching release declares a bound that an installed core package breaks is
installed without its dependencies, then its dependencies are installed with the constraints, leaving out only that
bound (each one said on the output); the other packages install as usual, with the constraints. Exit status: pip's,
or 1 when a core package changed.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

CORE = ("torch", "torchvision", "numpy", "pillow", "opencv-python-headless", "opencv-python")


def canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def installed_core() -> dict[str, str]:
    versions = {}
    for name in CORE:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def pip(*args: str) -> None:
    command = [sys.executable, "-m", "pip", "install", "--quiet", *args]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def top_level(requirements_file: Path) -> list[Requirement]:
    lines = (line.split("#", 1)[0].strip() for line in requirements_file.read_text().splitlines())
    return [Requirement(line) for line in lines if line]


def newest_releases(requirements: list[Requirement], constraints: Path, folder: str) -> dict[str, dict]:
    """pip's choice for each requirement alone (no dependencies, nothing installed): {name: its metadata}."""
    report = Path(folder) / "report.json"
    pip("--dry-run", "--no-deps", "--ignore-installed", "--report", str(report), "-c", str(constraints),
        *(str(r) for r in requirements))
    chosen = json.loads(report.read_text())["install"]
    return {canonical(item["metadata"]["name"]): item["metadata"] for item in chosen}


def split_dependencies(release: dict, core: dict[str, str]) -> tuple[list[str], list[str]]:
    """(the dependencies to install, notes on the core bounds left out) of a release's metadata."""
    keep, notes = [], []
    for text in release.get("requires_dist") or []:
        dependency = Requirement(text)
        if dependency.marker is not None and not dependency.marker.evaluate({"extra": ""}):
            continue  # another Python, or an extra we do not ask for
        name = canonical(dependency.name)
        if name in core and not dependency.specifier.contains(core[name], prereleases=True):
            notes.append(f"{release['name']} {release['version']} asks for {dependency}; keeping {name} {core[name]}")
            continue
        keep.append(str(dependency))
    return keep, notes


def main(argv: list[str]) -> int:
    requirements_file = Path(argv[0] if argv else Path(__file__).resolve().parents[1] / "requirements-app.txt")
    core = installed_core()
    with tempfile.TemporaryDirectory() as folder:
        constraints = Path(folder) / "core.txt"
        constraints.write_text("".join(f"{name}=={version}\n" for name, version in core.items()))
        wanted = top_level(requirements_file)
        releases = newest_releases(wanted, constraints, folder)
        plain, pinned, needed = [], [], []
        for requirement in wanted:
            release = releases[canonical(requirement.name)]
            keep, notes = split_dependencies(release, core)
            if not notes:
                plain.append(str(requirement))
                continue
            for note in notes:
                print(f"note: {note}", flush=True)
            pinned.append(f"{release['name']}=={release['version']}")
            needed += keep
        if pinned:
            pip("--no-deps", "-c", str(constraints), *pinned)
        if plain or needed:
            pip("-c", str(constraints), *dict.fromkeys(plain + needed))
    changed = {name: (version, installed_core().get(name)) for name, version in core.items()
               if installed_core().get(name) != version}
    if changed:
        print(f"error: core packages changed: {changed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
