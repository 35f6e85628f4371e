"""Wall time of a feature-level method's run with a cold and with a warm frozen-feature cache, side by side.

    python benchmarks/feature_cache.py [--method clip_adapter] [--dataset synth_shapes] [--model vladapt-tiny]
                                       [--epochs 20] [--seeds 1] [--out runs/bench-cache]

Generates the synthetic dataset, then times three `vladapt train` runs (base-to-new, 16 shots) in
fresh processes: (1) with an empty cache folder, (2) the same command again (every feature is read
back), (3) another hyper-parameter (``train.lr`` halved; the features do not depend on it). Printed:
seconds per run and the ratios cold / warm. The first run encodes the training images once per epoch
(one augmentation pass each) and the base and new test images once; the others read them back.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="clip_adapter")
    ap.add_argument("--dataset", default="synth_shapes")
    ap.add_argument("--model", default="vladapt-tiny")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1])
    ap.add_argument("--out", type=Path, default=Path("runs/bench-cache"))
    args = ap.parse_args()

    from vladapt.synth.datasets import write_dataset

    data, cache = args.out / "data", args.out / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    write_dataset(args.dataset, data, seed=0)
    base = [sys.executable, "-m", "vladapt.cli", "train", "--method", args.method, "--protocol", "base2new",
            "--dataset", args.dataset, "--root", str(data), "--model", args.model, "--quiet",
            "--feature-cache", str(cache), "--seeds", *map(str, args.seeds)]
    runs = [("cold cache", [], "a"), ("warm cache, same run", [], "b"), ("warm cache, lr halved", ["train.lr=0.001"], "c")]
    seconds = {}
    for name, extra, tag in runs:
        t0 = time.perf_counter()
        done = subprocess.run([*base, "--out", str(args.out / f"runs-{tag}"), f"train.epochs={args.epochs}", *extra],
                              capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{name}: vladapt train failed:\n{done.stderr[-2000:]}")
        seconds[name] = time.perf_counter() - t0
        print(f"  {name}: {seconds[name]:.1f} s", file=sys.stderr, flush=True)
    entries = len(list(cache.rglob("*.safetensors")))
    print(f"{args.method}, base2new on {args.dataset}, {args.model}, {args.epochs} epochs, seeds {args.seeds}; "
          f"{entries} cache entries\n")
    print("| run | seconds | cold / this |")
    print("|---|---:|---:|")
    cold = seconds["cold cache"]
    for name, s in seconds.items():
        print(f"| {name} | {s:.1f} | {cold / s:.2f} |")
    print("\n(each run includes starting Python and loading the backbone)")


if __name__ == "__main__":
    main()
