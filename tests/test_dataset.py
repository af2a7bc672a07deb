"""ForgeryDataset, its collate functions and worker seeding, and the training mixture / held-out split."""
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from datasets.dataset import CatchReadErrors, ForgeryDataset, collate_readable
from utils.training.sampling import ResumableSampler, SeededItems
from datasets.io import ImageReadError
from datasets.mixture import RepeatedRows, build_training_rows, split_holdout

SIZE, RATIO = 64, 4
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def write_rgb(path, rgb):
    assert cv2.imwrite(str(path), np.ascontiguousarray(rgb[:, :, ::-1]))
    return str(path)


def write_gray(path, gray):
    assert cv2.imwrite(str(path), gray)
    return str(path)


@pytest.fixture
def pair(tmp_path):
    """A 37×53 random image and a mask with a soft ramp (so the thresholds matter)."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    mask = np.zeros((37, 53), np.uint8)
    mask[5:30, 10:40] = np.linspace(0, 255, 30, dtype=np.uint8)[None, :]
    return rgb, mask, write_rgb(tmp_path / "image.png", rgb), write_gray(tmp_path / "mask.png", mask)


def test_train_item_matches_an_independent_opencv_computation(pair):
    rgb, mask, image_path, mask_path = pair
    item = ForgeryDataset([(image_path, mask_path)], mode="train", input_size=SIZE, gt_ratio=RATIO,
                          augment=False)[0]
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, SIZE, SIZE)
    expected_image = cv2.resize(rgb, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR).astype(np.float64) / 255
    np.testing.assert_allclose(item["image"].permute(1, 2, 0).numpy(), expected_image, atol=1e-6)
    binary = np.where(mask > 127, 255, 0).astype(np.uint8)
    small = cv2.resize(binary, (SIZE // RATIO, SIZE // RATIO), interpolation=cv2.INTER_LINEAR) > 127
    assert item["mask"].shape == (1, SIZE // RATIO, SIZE // RATIO)
    np.testing.assert_array_equal(item["mask"][0].numpy(), small.astype(np.float32))
    assert item["path"] == image_path and tuple(item["size"].tolist()) == (37, 53) and item["index"] == 0


@pytest.mark.parametrize("mode", ["val", "test"])
def test_val_and_test_keep_the_original_mask_size(pair, mode):
    rgb, mask, image_path, mask_path = pair
    item = ForgeryDataset([(image_path, mask_path)], mode=mode, input_size=SIZE)[0]
    assert item["image"].shape == (3, SIZE, SIZE)
    np.testing.assert_array_equal(item["mask"][0].numpy(), (mask > 127).astype(np.float32))


def test_rgb_order_and_scaling(tmp_path):
    red = np.zeros((20, 30, 3), np.uint8)
    red[..., 0] = 255
    gray = np.full((20, 30, 3), 51, np.uint8)
    rows = [(write_rgb(tmp_path / "red.png", red), ""), (write_rgb(tmp_path / "gray.png", gray), "")]
    dataset = ForgeryDataset(rows, mode="test", input_size=SIZE)
    image = dataset[0]["image"]
    assert torch.all(image[0] == 1) and torch.all(image[1:] == 0)
    assert torch.allclose(dataset[1]["image"], torch.full((3, SIZE, SIZE), 0.2))


@pytest.mark.parametrize("mode, mask_shape", [("train", (1, SIZE // RATIO, SIZE // RATIO)), ("test", (1, 20, 30))])
def test_authentic_rows_give_zero_masks(tmp_path, mode, mask_shape):
    path = write_rgb(tmp_path / "a.png", np.full((20, 30, 3), 200, np.uint8))
    item = ForgeryDataset([(path, "")], mode=mode, input_size=SIZE, augment=mode == "train", seed=0)[0]
    assert item["mask"].shape == mask_shape and not item["mask"].any()


def test_training_augmentation_keeps_shapes_and_binary_masks(pair):
    _, _, image_path, mask_path = pair
    dataset = ForgeryDataset([(image_path, mask_path)] * 6, mode="train", input_size=SIZE, seed=0)
    for item in dataset:
        assert item["image"].shape == (3, SIZE, SIZE) and 0 <= item["image"].min() <= item["image"].max() <= 1
        assert item["mask"].shape == (1, SIZE // RATIO, SIZE // RATIO)
        assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}


def test_any_image_layout_loads(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)  # input_size 16: the resize is the identity
    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full((16, 16), 7, np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray(rgb).convert("P", dither=Image.Dither.NONE).save(tmp_path / "palette.png")
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(tmp_path / "deep.png")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")
    names = ["gray.png", "rgba.png", "palette.png", "deep.png", "cmyk.jpg"]
    dataset = ForgeryDataset([(str(tmp_path / n), "") for n in names], mode="test", input_size=16)
    items = {name: dataset[i] for i, name in enumerate(names)}
    for name, item in items.items():
        assert item["image"].shape == (3, 16, 16) and tuple(item["size"].tolist()) == (16, 16), name
    expected_gray = torch.from_numpy(rgb[..., 0].astype(np.float32) / 255)
    for name in ("gray.png", "deep.png"):
        assert torch.allclose(items[name]["image"], expected_gray.expand(3, 16, 16), atol=1e-6), name
    expected_rgb = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    assert torch.allclose(items["rgba.png"]["image"], expected_rgb)
    # PIL's default palette is the 6-level web palette (steps of 51): each channel lands within about half a step.
    assert (items["palette.png"]["image"] - expected_rgb).abs().max() <= 30 / 255
    assert (items["cmyk.jpg"]["image"] - expected_rgb).abs().mean() < 0.1  # JPEG loss only


def test_unreadable_files_raise_naming_the_file(tmp_path, pair):
    _, _, image_path, mask_path = pair
    truncated = tmp_path / "truncated.jpg"
    data = cv2.imencode(".jpg", np.full((64, 64, 3), 99, np.uint8))[1].tobytes()
    truncated.write_bytes(data[: len(data) // 2])
    (tmp_path / "text.png").write_text("not an image")
    for bad in (str(truncated), str(tmp_path / "text.png"), str(tmp_path / "missing.png")):
        with pytest.raises(ImageReadError, match=Path(bad).name):
            ForgeryDataset([(bad, mask_path)], mode="test", input_size=SIZE)[0]
    with pytest.raises(ImageReadError, match="missing_mask.png"):
        ForgeryDataset([(image_path, str(tmp_path / "missing_mask.png"))], mode="test", input_size=SIZE)[0]


@pytest.mark.parametrize("mode", ["train", "test"])
def test_mask_size_mismatch_names_both_files(tmp_path, pair, mode):
    _, _, image_path, _ = pair
    other = write_gray(tmp_path / "small_mask.png", np.zeros((10, 10), np.uint8))
    with pytest.raises(ImageReadError) as error:
        ForgeryDataset([(image_path, other)], mode=mode, input_size=SIZE, augment=False)[0]
    assert "small_mask.png" in str(error.value) and "image.png" in str(error.value)


def test_unreadable_items_are_collected_by_file_and_the_readable_ones_collated(tmp_path, pair):
    _, _, image_path, mask_path = pair
    bad = str(tmp_path / "missing.png")
    dataset = CatchReadErrors(ForgeryDataset([(image_path, mask_path), (bad, ""), (image_path, "")], mode="train",
                                             input_size=SIZE, augment=False))
    collated = collate_readable([dataset[i] for i in range(3)])
    assert collated["bad_items"] == [(bad, "no such file")]
    assert collated["image"].shape == (2, 3, SIZE, SIZE) and collated["tampered"].tolist() == [True, False]
    assert collate_readable([dataset[1], dataset[1]]) == {"bad_items": [(bad, "no such file")] * 2}
    with pytest.raises(ImageReadError, match="missing.png"):
        dataset.dataset[1]


def test_perturb_touches_the_image_only(pair):
    rgb, mask, image_path, mask_path = pair
    item = ForgeryDataset([(image_path, mask_path)], mode="test", input_size=SIZE,
                          perturb=lambda image: 255 - image)[0]
    expected = cv2.resize(255 - rgb, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR) / 255
    np.testing.assert_allclose(item["image"].permute(1, 2, 0).numpy(), expected, atol=1e-6)
    np.testing.assert_array_equal(item["mask"][0].numpy(), mask > 127)


def test_bad_arguments_are_refused(pair):
    _, _, image_path, mask_path = pair
    with pytest.raises(ValueError, match="mode"):
        ForgeryDataset([(image_path, mask_path)], mode="training")
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        ForgeryDataset([image_path, mask_path])


def _epoch(dataset, workers, seed):
    """One epoch as the trainer loads it: per-item seeds from the sampler, whatever the number of workers."""
    loader = DataLoader(SeededItems(dataset), batch_size=2, num_workers=workers, collate_fn=collate_readable,
                        sampler=ResumableSampler(len(dataset), 2, seed=seed))
    return [batch["image"] for batch in loader]


def test_workers_see_the_same_augmentations_for_the_same_seed(pair):
    _, _, image_path, mask_path = pair
    dataset = ForgeryDataset([(image_path, mask_path)] * 8, mode="train", input_size=32)
    first, second, other = _epoch(dataset, 2, 0), _epoch(dataset, 2, 0), _epoch(dataset, 2, 1)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    # The two workers draw different streams: worker 0 loads batches 0 and 2, worker 1 batches 1 and 3.
    assert not torch.equal(first[0], first[1])


def test_shared_casia2_sample_loads():
    folder = SHARED_DATA / "CASIA2_samples"
    if not folder.is_dir():
        pytest.skip("../shared/data is absent")
    image = sorted((folder / "Tp").iterdir())[0]
    mask = folder / "Gt" / f"{image.stem}_gt.png"
    item = ForgeryDataset([(str(image), str(mask))], mode="test")[0]
    height, width = item["size"].tolist()
    assert item["image"].shape == (3, 512, 512) and item["mask"].shape == (1, height, width)
    assert 0 < item["mask"].mean() < 1


# --------------------------------------------------------------------------------------------- mixture


def rows_named(prefix, count):
    return np.array([(f"{prefix}/{i}.png", f"{prefix}/{i}_gt.png") for i in range(count)])


def test_training_rows_expand_repeats_lazily():
    a, b = rows_named("a", 3), rows_named("b", 2)
    rows = build_training_rows([(a, 1), (b, 3)])
    assert isinstance(rows, RepeatedRows) and len(rows) == 3 + 6
    assert [tuple(rows[i]) for i in range(len(rows))] == [tuple(r) for r in a] + [tuple(r) for r in b] * 3
    assert rows.rows.shape == (5, 2)  # unique rows stored once
    dataset_rows = ForgeryDataset(rows, mode="val").rows
    assert dataset_rows is rows
    with pytest.raises(ValueError, match="repeat"):
        build_training_rows([(a, 0)])


def test_holdout_is_seeded_proportional_and_never_trained_on():
    a, b = rows_named("a", 100), rows_named("b", 40)
    entries = [(a, 1), (b, 10)]  # samples per epoch: 100 and 400
    training, validation = split_holdout(entries, 20, seed=3)
    assert validation.shape == (20, 2)
    held_out = set(validation[:, 0])
    assert sum(p.startswith("b/") for p in held_out) == 16  # 400 / 500 of 20
    for (rows, repeat), (original, original_repeat) in zip(training, entries):
        assert repeat == original_repeat and not held_out & set(rows[:, 0])
        assert len(rows) + sum(p.startswith(original[0, 0][:2]) for p in held_out) == len(original)
    again = split_holdout(entries, 20, seed=3)[1]
    np.testing.assert_array_equal(validation, again)
    assert not np.array_equal(validation, split_holdout(entries, 20, seed=4)[1])


def test_holdout_removes_duplicates_across_lists_and_checks_size():
    shared = rows_named("s", 5)
    training, validation = split_holdout([(shared, 1), (shared.copy(), 2)], 4, seed=0)
    held_out = set(validation[:, 0])
    assert all(not held_out & set(rows[:, 0]) for rows, _ in training)
    with pytest.raises(ValueError, match="n_val"):
        split_holdout([(shared, 1)], 5, seed=0)


def test_mixture_reads_file_lists(tmp_path):
    pytest.importorskip("datasets.flist")
    a, b = rows_named("a", 4), rows_named("b", 2)
    np.save(tmp_path / "a_4.npy", a)
    np.save(tmp_path / "b_2.npy", b)
    rows = build_training_rows([(str(tmp_path / "a_4.npy"), 2), (tmp_path / "b_2.npy", 1)])
    assert len(rows) == 10 and tuple(rows[9]) == tuple(b[1])
