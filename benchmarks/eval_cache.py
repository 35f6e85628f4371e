"""Evaluation throughput without and with the decoded-image cache, side by side.

    python benchmarks/eval_cache.py [--threads 1] [--images 500] [--vit-images 32] [--batch-size 64] [--repeats 2]
                                    [--precision auto]

Writes generated JPEGs (500 x 375 px, like a photo dataset) to a temporary folder and evaluates
zero-shot CLIP on them through the protocol runner (``evaluate_items``) three times: without the
cache (every image decoded, resized and cropped), with an empty cache (the first run decodes and
stores the images) and again (a hit: the images are read from the cache). Two backbones: the bundled
``vladapt-tiny`` (64 px input, where decoding dominates) and ViT-B/16 with random weights (224 px, where
the image encoder dominates). Printed: images per second of each run (the runs without the cache and
the hits: the fastest of ``--repeats``) and the ratio hit / no cache, by wall time and by this
process's CPU time (the steadier figure on a machine shared with other jobs). The ratio cannot exceed
(decoding + encoding) / encoding: the cache removes the decoding, not the image encoder; a second table
times the input pipeline alone (iterating the evaluation loader, no model) to show that split.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from perf_common import add_precision_option, counted_gflop, matmul_peak, precision_of  # noqa: E402

CLASSES = ["airplane", "bicycle", "bird", "boat", "car", "cat", "dog", "flower", "horse", "truck"]


def write_images(folder: Path, n: int, size: tuple[int, int] = (500, 375), seed: int = 0) -> list:
    """``n`` JPEGs of ``size`` with smooth random content (quality 90), labelled round-robin."""
    from vladapt.data.base import Datum

    rng = np.random.default_rng(seed)
    w, h = size
    items = []
    for i in range(n):
        coarse = rng.integers(0, 256, (h // 25 + 1, w // 25 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((w, h), Image.BILINEAR)
        noise = rng.integers(-12, 13, (h, w, 3))
        img = Image.fromarray(np.clip(np.asarray(img, np.int16) + noise, 0, 255).astype(np.uint8))
        name = f"{i:05d}.jpg"
        img.save(folder / name, quality=90)
        items.append(Datum(path=name, label=i % len(CLASSES), classname=CLASSES[i % len(CLASSES)]))
    return items


def images_per_second(settings, method, splits) -> tuple[float, float, float]:
    """(images per wall second, images per CPU second of this process, accuracy) of one evaluation
    through the protocol runner."""
    from vladapt.protocols.runner import evaluate_items

    t0, c0 = time.perf_counter(), time.process_time()
    res = evaluate_items(settings, method, splits, "bench", "bench")
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return len(splits.test) / wall, len(splits.test) / cpu, res["accuracy"]


def loader_rate(loader, n: int) -> float:
    """Images per wall second of iterating ``loader`` alone (no model)."""
    t0 = time.perf_counter()
    for _ in loader:
        pass
    return n / (time.perf_counter() - t0)


def fastest(runs: list[tuple[float, float, float]]) -> tuple[float, float, float]:
    """The best wall and the best CPU rate of ``runs`` (their accuracies are checked equal)."""
    return max(r[0] for r in runs), max(r[1] for r in runs), runs[0][2]


def run_case(model: str, items: list, folder: Path, cache: Path, batch_size: int, workers: int,
             repeats: int, dtype: torch.dtype) -> dict[str, tuple[float, float, float]]:
    from vladapt.backbones import load_clip
    from vladapt.data import DatasetSplits
    from vladapt.methods import create_method
    from vladapt.protocols.runner import RunSettings

    backbone = load_clip(model, dtype=dtype)  # vladapt-tiny: its bundled weights; ViT-B-16: seeded random weights
    splits = DatasetSplits(name="bench", image_root=folder, train=[], val=[], test=items, classnames=CLASSES)
    method = create_method("zeroshot", backbone, CLASSES)

    def settings(image_cache: Path | None) -> RunSettings:
        return RunSettings(backbone=backbone, root=folder, method="zeroshot", batch_size=batch_size,
                           workers=workers, progress=False, image_cache=image_cache)

    warm = DatasetSplits(name="bench", image_root=folder, train=[], val=[], test=items[:2], classnames=CLASSES)
    images_per_second(settings(None), method, warm)  # the text classifier and first-call costs, outside the timing
    shutil.rmtree(cache, ignore_errors=True)
    plain = fastest([images_per_second(settings(None), method, splits) for _ in range(repeats)])
    build = images_per_second(settings(cache), method, splits)
    hit = fastest([images_per_second(settings(cache), method, splits) for _ in range(repeats)])
    if not plain[2] == build[2] == hit[2]:
        raise SystemExit(f"{model}: accuracy differs with the cache ({plain[2]}, {build[2]}, {hit[2]})")
    from torch.utils.data import DataLoader

    from vladapt.data import ImageDataset
    from vladapt.data.decoded import evaluation_loader

    decoding = DataLoader(ImageDataset(items, folder, backbone.test_transform), batch_size=batch_size,
                          num_workers=workers)
    reading = evaluation_loader(items, folder, backbone.test_transform, cache, batch_size, progress=False)
    loaders = (max(loader_rate(decoding, len(items)) for _ in range(repeats)),
               max(loader_rate(reading, len(items)) for _ in range(repeats)))
    probe = torch.stack([backbone.test_transform(Image.open(folder / d.path)) for d in items[:8]])
    with torch.no_grad():
        gflop = counted_gflop(lambda: method(probe)) / len(probe)  # the model's work per image
    return {"plain": plain, "build": build, "hit": hit, "loaders": loaders, "gflop": gflop}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    ap.add_argument("--images", type=int, default=500, help="images for vladapt-tiny (default: %(default)s)")
    ap.add_argument("--vit-images", type=int, default=32, help="images for ViT-B/16 (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=64, help="evaluation batch size (default: %(default)s)")
    ap.add_argument("--workers", type=int, default=0, help="data loader worker processes (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=2,
                    help="runs without the cache and hits timed, the fastest reported (default: %(default)s)")
    add_precision_option(ap)
    args = ap.parse_args()
    dtype, name = precision_of(args)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", UserWarning)

    with tempfile.TemporaryDirectory(prefix="vladapt-eval-cache-") as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        t0 = time.perf_counter()
        items = write_images(folder, max(args.images, args.vit_images))
        print(f"wrote {len(items)} JPEGs of 500 x 375 px in {time.perf_counter() - t0:.1f} s", flush=True)
        cases = [("vladapt-tiny", "vladapt-tiny", items[:args.images]),
                 ("ViT-B/16 (random weights)", "ViT-B-16", items[:args.vit_images])]
        rows = []
        for label, model, subset in cases:
            rates = run_case(model, subset, folder, Path(tmp) / f"cache-{model}", args.batch_size, args.workers,
                             args.repeats, dtype)
            rows.append((label, len(subset), rates))
            print(f"  {label}: done", flush=True)

    print(f"\nzero-shot evaluation in {name}, {args.threads} torch thread(s), batch size {args.batch_size}, "
          f"{args.workers} loader worker(s), fastest of {args.repeats}; images per wall second "
          "(per CPU second of this process)\n")
    print("| backbone | images | no cache | cache, first run (build) | cache, second run (hit) "
          "| hit / no cache, wall | hit / no cache, CPU |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, n, r in rows:
        cells = " | ".join(f"{r[k][0]:.1f} ({r[k][1]:.1f})" for k in ("plain", "build", "hit"))
        print(f"| {label} | {n} | {cells} | {r['hit'][0] / r['plain'][0]:.2f}x | {r['hit'][1] / r['plain'][1]:.2f}x |")
    peak = matmul_peak(args.threads)[name]
    print(f"\nthe model's work at this CPU's {name} matmul peak ({peak:.1f} GFLOP/s, measured now): the share of the "
          "peak each evaluation reaches\n")
    print("| backbone | GFLOP / image | no cache | cache hit |")
    print("|---|---:|---:|---:|")
    for label, _, r in rows:
        print(f"| {label} | {r['gflop']:.3f} | {100 * r['plain'][0] * r['gflop'] / peak:.1f}% "
              f"| {100 * r['hit'][0] * r['gflop'] / peak:.1f}% |")
    print("\ninput pipeline alone (iterating the evaluation loader, no model); images per wall second\n")
    print("| backbone | decoding | reading the cache | ratio |")
    print("|---|---:|---:|---:|")
    for label, _, r in rows:
        dec, hit = r["loaders"]
        print(f"| {label} | {dec:.1f} | {hit:.1f} | {hit / dec:.1f}x |")


if __name__ == "__main__":
    main()
