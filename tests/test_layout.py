"""The import direction of the layers (README, "Layout"): library packages and low-level helpers never import the
training or evaluation layers; the low-level helpers import no library package; the two layers stay apart."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LOW_LEVEL = sorted(p.relative_to(REPO) for p in (REPO / "utils").glob("*.py"))
LIBRARY = sorted(p.relative_to(REPO) for folder in ("datasets", "models", "losses") for p in (REPO / folder).glob("*.py"))
TRAINING = sorted(p.relative_to(REPO) for p in (REPO / "utils" / "training").glob("*.py"))
EVALUATION = sorted(p.relative_to(REPO) for p in (REPO / "utils" / "evaluation").glob("*.py"))


def imported_modules(path: Path) -> set[str]:
    """Every absolute module a file imports (relative imports stay inside its own package)."""
    tree = ast.parse((REPO / path).read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def imports_any(path: Path, prefixes: tuple[str, ...]) -> list[str]:
    return sorted(name for name in imported_modules(path) if name.startswith(prefixes))


def test_the_layers_are_where_the_readme_says():
    assert LOW_LEVEL and LIBRARY and TRAINING and EVALUATION


@pytest.mark.parametrize("path", LIBRARY + LOW_LEVEL, ids=str)
def test_library_and_helpers_never_import_the_training_or_evaluation_layers(path):
    assert imports_any(path, ("utils.training", "utils.evaluation")) == []


@pytest.mark.parametrize("path", LOW_LEVEL, ids=str)
def test_low_level_helpers_import_no_library_package(path):
    assert imports_any(path, ("datasets", "models", "losses", "stage1", "stage2")) == []


@pytest.mark.parametrize("path", TRAINING, ids=str)
def test_the_training_layer_does_not_import_the_evaluation_layer(path):
    assert imports_any(path, ("utils.evaluation", "stage1", "stage2")) == []


@pytest.mark.parametrize("path", EVALUATION, ids=str)
def test_the_evaluation_layer_does_not_import_the_training_layer(path):
    assert imports_any(path, ("utils.training", "stage1", "stage2")) == []


def test_the_check_sees_a_forbidden_import(tmp_path, monkeypatch):
    """The checker itself: a file that imports the training layer is caught."""
    monkeypatch.setattr("test_layout.REPO", tmp_path)
    (tmp_path / "probe.py").write_text("from utils.training.engine import Trainer\nimport numpy\n")
    assert imports_any(Path("probe.py"), ("utils.training",)) == ["utils.training.engine",
                                                                     "utils.training.engine.Trainer"]
