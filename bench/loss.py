"""Time `losses.multi_view_pixel_contrast` against a plain official-style loop at the official scale.

The plain loop is the formulation of the official code: per image and per InfoNCE call, normalise the samples,
build the n×n anchor similarity matrix, drop its diagonal, average, concatenate with the n×m anchor–negative
similarities and take the cross-entropy. Both run on the same samples (`indices=`), so their values must agree.
Defaults are the official stage-1 scale: 4 images, 256 channels, scale-1 maps 128×128 (then 64², 32², 16²),
a 20 % forged rectangle per image, at most 5000 samples per set.

Prints one table: median wall and process-CPU seconds of forward+backward, memory saved for backward (bytes of
the distinct tensors autograd keeps, a device-independent stand-in for the peak; on CUDA also the peak
allocated), the speed-ups and the difference between the two totals. Then the roofline: ours against the
three n×m×C matrix products per InfoNCE call that any exact implementation computes (the anchor–negative
logits, and in backward the gradients of anchors and negatives), bare, on the same sizes, timed in the same runs.

    .venv/bin/python bench/loss.py [--runs 3] [--batch 4] [--size 128] [--max-samples 5000] [--device cpu]
"""
import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from losses import CONTRAST_PAIRS, multi_view_pixel_contrast, sample_indices  # noqa: E402


def plain_info_nce(anchors, negatives, temperature):
    anchors, negatives = F.normalize(anchors, dim=1), F.normalize(negatives, dim=1)
    count = anchors.shape[0]
    similarity = anchors @ anchors.T
    off_diagonal = ~torch.eye(count, dtype=torch.bool, device=anchors.device)
    positive = similarity.masked_select(off_diagonal).view(count, count - 1).mean(1, keepdim=True)
    logits = torch.cat([positive, anchors @ negatives.T], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(count, dtype=torch.long, device=anchors.device))


def plain_loss(view1, view2, samples, temperature=0.1):
    """Official-style total (all sets are non-empty at the benchmark scale, so no undefined call arises)."""
    per_image = []
    for image in range(view1[0].shape[0]):
        def rows(feature_map):
            return feature_map[image].flatten(1).T
        pools = {"fine_view1": rows(view1[0]), "fine_view2": rows(view2[0]),
                 "coarse_view1": torch.cat([rows(f) for f in view1[1:]])}
        image_loss = 0
        for k, pair in enumerate(CONTRAST_PAIRS):
            anchors = pools[pair.anchor_pool][samples.anchors[image][k].to(view1[0].device)]
            negatives = pools[pair.negative_pool][samples.negatives[image][k].to(view1[0].device)]
            image_loss = image_loss + plain_info_nce(anchors, negatives, temperature)
        per_image.append(image_loss)
    return torch.stack(per_image).mean()


def bare_matmuls(samples, channels, device, seed=2):
    """The loss's bound: per image and call, the logits s = A Nᵀ (n×m), then s N and sᵀ A, on random rows of the
    sampled sizes; nothing else (no normalising, gathering, exp or reductions)."""
    generator = torch.Generator().manual_seed(seed)
    operands = [(torch.randn(anchors.numel(), channels, generator=generator).to(device),
                 torch.randn(negatives.numel(), channels, generator=generator).to(device))
                for image_anchors, image_negatives in zip(samples.anchors, samples.negatives)
                for anchors, negatives in zip(image_anchors, image_negatives)]

    def run():
        for anchors, negatives in operands:
            logits = anchors @ negatives.T
            logits @ negatives
            logits.T @ anchors
    return run, sum(a.shape[0] * n.shape[0] for a, n in operands) * 3 * channels


def time_bound(run, device):
    """(wall seconds, process CPU seconds) of one run of the bare products."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    with torch.no_grad():
        run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, time.process_time() - cpu_start


def make_inputs(batch, channels, size, forged_fraction, device, seed=0):
    """Two views of non-negative (post-ReLU) features and a mask with one forged rectangle per image."""
    generator = torch.Generator().manual_seed(seed)
    views = [[torch.relu(torch.randn(batch, channels, size >> s, size >> s, generator=generator)).to(device)
              .requires_grad_() for s in range(4)] for _ in range(2)]
    side = round(size * forged_fraction ** 0.5)
    mask = torch.zeros(batch, size, size)
    for image in range(batch):
        top, left = torch.randint(0, size - side + 1, (2,), generator=generator).tolist()
        mask[image, top:top + side, left:left + side] = 1
    return views, mask.to(device)


def measure(loss_fn, inputs, device):
    """(wall seconds, process CPU seconds, MiB saved for backward, CUDA peak MiB or nan, loss value) of one
    forward+backward. CPU seconds are steadier than wall seconds on a machine shared with other jobs."""
    for tensor in inputs:
        tensor.grad = None
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_fn()
    loss.backward()
    peak = float("nan")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = (torch.cuda.max_memory_allocated(device) - baseline) / 2 ** 20
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return seconds, cpu_seconds, sum(saved.values()) / 2 ** 20, peak, loss.item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--size", type=int, default=128, help="scale-1 map side (1/4 of a 512 input)")
    parser.add_argument("--forged", type=float, default=0.2, help="forged fraction per image")
    parser.add_argument("--max-samples", type=int, default=5000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    (view1, view2), mask = make_inputs(args.batch, args.channels, args.size, args.forged, device)
    inputs = [*view1, view2[0]]
    samples = sample_indices(mask, [tuple(f.shape[-2:]) for f in view1], args.max_samples,
                             generator=torch.Generator().manual_seed(1))
    candidates = {
        "losses (ours)": lambda: multi_view_pixel_contrast(view1, view2, mask, indices=samples)["total"],
        "plain loop": lambda: plain_loss(view1, view2, samples),
    }
    bound, multiply_adds = bare_matmuls(samples, args.channels, device)
    results = {name: [] for name in candidates}
    bound_runs = []
    for _ in range(args.runs):
        for name, loss_fn in candidates.items():
            results[name].append(measure(loss_fn, inputs, device))
        bound_runs.append(time_bound(bound, device))

    machine = platform.processor() or platform.machine()
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"machine: {machine} / {platform.node()} ({os.cpu_count()} CPUs), device {device_name}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    sizes = ", ".join(f"{args.size >> s}²" for s in range(4))
    print(f"{args.batch} images, {args.channels} channels, maps {sizes}, {args.forged:.0%} forged, "
          f"max_samples {args.max_samples}; forward+backward, median of {args.runs} runs")
    print(f"{'implementation':<16} {'wall s':>8} {'CPU s':>8} {'saved MiB':>10} {'CUDA peak MiB':>14} "
          f"{'speed-up wall':>14} {'speed-up CPU':>13}")
    plain = np.median(np.array([r[:2] for r in results["plain loop"]]), axis=0)
    for name, runs in results.items():
        wall, cpu = np.median(np.array([r[:2] for r in runs]), axis=0)
        print(f"{name:<16} {wall:8.2f} {cpu:8.2f} {runs[0][2]:10.0f} {runs[0][3]:14.0f} "
              f"{plain[0] / wall:13.2f}x {plain[1] / cpu:12.2f}x")
    ours, plain_total = results["losses (ours)"][0][4], results["plain loop"][0][4]
    print(f"total: ours {ours:.6f}, plain {plain_total:.6f}, "
          f"relative difference {abs(ours - plain_total) / abs(plain_total):.2e}")
    bound_wall, bound_cpu = np.median(np.array(bound_runs), axis=0)
    ours_wall, ours_cpu = np.median(np.array([r[:2] for r in results["losses (ours)"]]), axis=0)
    print(f"\nroofline: three bare n×m×C products per call ({multiply_adds / 1e9:.1f} G multiply-adds in all)")
    print(f"{'':<30} {'wall s':>8} {'CPU s':>8} {'GFLOP/s (wall)':>15}")
    for name, wall, cpu in (("losses (ours)", ours_wall, ours_cpu), ("bare products (the bound)", bound_wall, bound_cpu)):
        print(f"{name:<30} {wall:8.2f} {cpu:8.2f} {2 * multiply_adds / wall / 1e9:15.1f}")
    print(f"ours / bound: {ours_wall / bound_wall:.2f}× wall, {ours_cpu / bound_cpu:.2f}× CPU")

if __name__ == "__main__":
    main()
