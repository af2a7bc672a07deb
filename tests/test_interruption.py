"""Ctrl-C / SIGTERM with real signals: training, testing and inference stop at a safe point with one line, keep
every finished output, and a second signal stops at once."""
from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_training import synthetic_list, write_config  # noqa: F401  (synthetic_list is a fixture)
from tiny_weights import save_tiny_weights

from models.checkpoint import read_training_checkpoint

REPO = Path(__file__).resolve().parents[1]
INTERRUPTED_STATUS = 130


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def wait_for(condition, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the process ended before it was interrupted: {process.stderr.read()[-2000:]}")
        if time.time() > deadline:
            process.kill()
            pytest.fail("the process never reached the point to interrupt")
        time.sleep(0.1)


def finish(process: subprocess.Popen) -> tuple[int, list[str]]:
    _, stderr = process.communicate(timeout=120)
    # what the process says at the end, with tqdm bars and the training log's "[time logger] ..." lines aside
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", stderr)  # terminal escapes of the closing tqdm bar
    lines = [line for line in text.splitlines() if line.strip() and "%|" not in line and not line.startswith("[")]
    return process.returncode, lines


def test_training_stops_between_steps_and_keeps_its_checkpoint(synthetic_list, tmp_path):  # noqa: F811
    config = write_config(tmp_path, 1, synthetic_list)
    out = tmp_path / "run"
    process = start([str(REPO / "stage1" / "train.py"), "--config", config, "--out", str(out), "--max-steps", "400",
                     "SOLVER.VAL_EVERY", "4"])
    wait_for(lambda: (out / "latest.pth").exists(), process)
    process.send_signal(signal.SIGINT)
    status, lines = finish(process)
    assert status == INTERRUPTED_STATUS
    assert "Traceback" not in "\n".join(lines)
    assert len(lines) == 1 and lines[0].startswith("interrupted at step") and "--resume" in lines[0]
    saved = read_training_checkpoint(out / "latest.pth")  # whole and readable
    assert f"(step {saved['step']})" in lines[0]


def test_a_second_signal_stops_at_once(synthetic_list, tmp_path):  # noqa: F811
    config = write_config(tmp_path, 1, synthetic_list)
    out = tmp_path / "run"
    # one validation at the very end: the first signal waits for a step boundary, the second must not
    process = start([str(REPO / "stage1" / "train.py"), "--config", config, "--out", str(out), "--max-steps", "400",
                     "SOLVER.VAL_EVERY", "100000", "SOLVER.LOG_EVERY", "1"])
    wait_for(lambda: (out / "train.csv").exists(), process)
    process.send_signal(signal.SIGINT)
    process.send_signal(signal.SIGINT)
    status, lines = finish(process)
    assert status == INTERRUPTED_STATUS and "Traceback" not in "\n".join(lines)
    assert not (out / "latest.pth").exists()


@pytest.fixture(scope="module")
def many_images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(60):
        Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(folder / f"img_{i:02d}.png")
    return folder


def test_inference_keeps_the_outputs_and_scores_of_the_images_done(many_images, tmp_path):
    weights = save_tiny_weights(tmp_path, "ours.pth", 0, "official.pth", 1)["ours"][0]
    out = tmp_path / "out"
    process = start([str(REPO / "stage2" / "infer.py"), "--weights", str(weights), "--input", str(many_images),
                     "--out", str(out), "--num-workers", "0", "--no-progress"])
    wait_for(lambda: out.is_dir() and len(list(out.glob("*_mask.png"))) >= 2, process)
    process.send_signal(signal.SIGTERM)  # what a job scheduler sends
    status, lines = finish(process)
    assert status == INTERRUPTED_STATUS and len(lines) == 1 and "--skip-existing" in lines[0]
    with open(out / "scores.csv", newline="") as f:
        scored = [row["name"] for row in csv.DictReader(f)]
    masks = sorted(p.name.removesuffix("_mask.png") for p in out.glob("*_mask.png"))
    assert 2 <= len(scored) < 60 and sorted(scored) == masks  # every finished image has its row, and only those
    assert not [p for p in os.listdir(out) if p.startswith(".")]  # no temporary left behind


def test_testing_writes_the_per_image_rows_of_the_images_done(many_images, tmp_path):
    weights = save_tiny_weights(tmp_path, "ours.pth", 0, "official.pth", 1)["ours"][0]
    rows = np.array([(str(p), "") for p in sorted(many_images.iterdir())])
    flist = tmp_path / "many_60.npy"
    np.save(flist, rows)
    out = tmp_path / "out"
    process = start([str(REPO / "stage2" / "test.py"), "--weights", str(weights), "--flist", str(flist),
                     "--out", str(out), "--num-workers", "0", "--no-progress", "--save-masks"])
    wait_for(lambda: len(list((out / "many_60" / "masks").glob("*.png"))) >= 2
             if (out / "many_60" / "masks").is_dir() else False, process)
    process.send_signal(signal.SIGINT)
    status, lines = finish(process)
    assert status == INTERRUPTED_STATUS and len(lines) == 1 and "per_image.csv" in lines[0]
    with open(out / "many_60" / "per_image.csv", newline="") as f:
        done = list(csv.DictReader(f))
    assert 2 <= len(done) < 60
    assert not (out / "metrics.json").exists()
