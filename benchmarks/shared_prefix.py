"""Evaluating N checkpoints on one test set: each on its own (plain) vs with a shared frozen prefix.

    python benchmarks/shared_prefix.py [--checkpoints 4] [--images 32] [--batch 16] [--threads 1] [--precision auto]

N MMA / RMAdapter methods with different random adapter weights (alternating), adapting the image
tower from block k (1-based; ViT-B/16: MMA's default k = 5 of L = 12; vladapt-tiny, 4 blocks:
k = 3), on M random images, for ViT-B/16 with random weights and the bundled vladapt-tiny. The plain
path runs ``engine.evaluate.evaluate`` per method; the shared path one ``evaluate_many`` over all of
them (its probe of the start blocks included), which computes blocks 1..k-1 once per image. Text
classifiers are built before the timing (both paths cache them). The ideal speed-up counts image-tower
blocks only: N*L / ((k-1) + N*(L-k+1)); the patch embedding, the text side and the classifiers are
outside it, so the measured speed-up is a little lower.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from perf_common import add_precision_option, counted_gflop, matmul_peak, precision_of  # noqa: E402

CLASSES = ["cat", "dog", "red star", "blue ring", "green cross", "yellow square", "car", "tree", "house", "boat"]


def build_methods(backbone, n: int, start: int) -> dict:
    from vladapt.methods import create_method

    methods = {}
    for i in range(n):
        name = ("mma", "rmadapter")[i % 2]
        m = create_method(name, backbone, CLASSES, {"adapter_start": start})
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in m.trainable_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        methods[f"{name}-{i}"] = m.eval()
    return methods


def run(model: str, start: int, args) -> tuple:
    from vladapt.backbones import load_clip
    from vladapt.engine.evaluate import evaluate, evaluate_many

    backbone = load_clip(model, dtype=args.dtype)  # ViT-B-16: seeded random weights; vladapt-tiny: its bundled weights
    size = backbone.image_size
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.images, 3, size, size, generator=g)
    labels = torch.randint(len(CLASSES), (args.images,), generator=g)
    loader = DataLoader(TensorDataset(images, labels), batch_size=args.batch)
    methods = build_methods(backbone, args.checkpoints, start)
    with torch.no_grad():
        for m in methods.values():  # text classifiers, cached by each method
            m(images[:1])
    plain_s = shared_s = float("inf")
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        plain = {name: evaluate(m, loader, len(CLASSES), progress=False) for name, m in methods.items()}
        plain_s = min(plain_s, time.perf_counter() - t0)
        t0 = time.perf_counter()
        shared = evaluate_many(methods, loader, len(CLASSES), progress=False)
        shared_s = min(shared_s, time.perf_counter() - t0)
    if shared != plain:
        raise SystemExit(f"{model}: the shared-prefix results differ from the plain ones")
    plain_gflop = counted_gflop(lambda: [evaluate(m, loader, len(CLASSES), progress=False) for m in methods.values()])
    shared_gflop = counted_gflop(lambda: evaluate_many(methods, loader, len(CLASSES), progress=False))
    layers, n, k = backbone.model.visual.num_layers, args.checkpoints, start
    ideal = n * layers / ((k - 1) + n * (layers - k + 1))
    return (model, layers, k, n, args.images, plain_s, shared_s, plain_s / shared_s, ideal,
            plain_gflop / plain_s, shared_gflop / shared_s, plain_gflop / shared_gflop)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoints", type=int, default=4, help="N methods evaluated together")
    ap.add_argument("--images", type=int, default=32, help="M test images")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per path (the best is reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--models", nargs="+", default=["ViT-B-16:5", "vladapt-tiny:3"],
                    help="MODEL:K, K the first adapted image-tower block (1-based)")
    add_precision_option(ap)
    args = ap.parse_args()
    args.dtype, name = precision_of(args)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch {args.batch}, {name}")
    rows = [run(spec.rsplit(":", 1)[0], int(spec.rsplit(":", 1)[1]), args) for spec in args.models]
    peak = matmul_peak()[name]
    head = ("model", "L", "k", "N", "M", "plain s", "shared s", "speed-up", "ideal", "FLOP ratio",
            "plain % of peak", "shared % of peak")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for model, layers, k, n, m, plain_s, shared_s, speedup, ideal, plain_rate, shared_rate, flop_ratio in rows:
        print(f"| {model} | {layers} | {k} | {n} | {m} | {plain_s:.2f} | {shared_s:.2f} | {speedup:.2f}x | {ideal:.2f}x "
              f"| {flop_ratio:.2f}x | {100 * plain_rate / peak:.0f}% | {100 * shared_rate / peak:.0f}% |")
    print(f"{name} matmul peak of this CPU, measured now: {peak:.1f} GFLOP/s; FLOP ratio: counted FLOPs plain / shared")
    print("results of the two paths: equal (accuracy, per-class counts)")


if __name__ == "__main__":
    main()
