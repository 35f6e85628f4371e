"""Wall time of one small synthetic ``vladapt bench`` grid with 1 and with 2 local worker processes.

Each setting runs the same grid from nothing (a fresh results folder and a fresh feature cache) as
``vladapt bench`` subprocesses, one after the other, on the demo's synthetic datasets (written once,
before timing) with each method's ``demo`` config; the machine's load (``uptime``) is printed
before and after each, since other jobs on a shared machine change the numbers.

    python benchmarks/bench_workers.py --out runs/bench_workers
    python benchmarks/bench_workers.py --out runs/bench_workers --workers 1 2 --methods zeroshot coop --shots 1
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/bench_workers"))
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--methods", nargs="+", default=["zeroshot", "clip_adapter", "coop"])
    ap.add_argument("--datasets", nargs="+", default=["synth_shapes", "synth_counts"])
    ap.add_argument("--protocols", nargs="+", default=["fewshot"])
    ap.add_argument("--shots", nargs="+", default=["1", "4"])
    ap.add_argument("--seeds", nargs="+", default=["1", "2"])
    ap.add_argument("--model", default="vladapt-tiny")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = ap.parse_args()

    from vladapt.synth.datasets import write_dataset

    root = args.out / "data"
    for name in args.datasets:  # written before any timing (the grids would otherwise write them)
        write_dataset(name, root, seed=0, progress=False)
    cores = len(os.sched_getaffinity(0))
    rows = []
    for workers in args.workers:
        out, cache = args.out / f"workers_{workers}", args.out / f"features_{workers}"
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
        cmd = [sys.executable, "-m", "vladapt.cli", "bench", "--methods", *args.methods, "--datasets", *args.datasets,
               "--protocols", *args.protocols, "--shots", *args.shots, "--seeds", *args.seeds, "--root", str(root),
               "--out", str(out), "--config-name", "demo", "--model", args.model, "--workers", str(workers),
               "--feature-cache", str(cache), *args.overrides]
        before = uptime()
        print(f"$ {' '.join(cmd)}\n  before: {before}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - t0
        after = uptime()
        print(proc.stdout.rstrip().splitlines()[-1] if proc.stdout.strip() else "", flush=True)
        if proc.returncode != 0:
            print(proc.stdout, proc.stderr, file=sys.stderr)
            sys.exit(f"the grid with {workers} worker(s) failed (exit code {proc.returncode})")
        print(f"  after:  {after}", flush=True)
        rows.append((workers, max(1, cores // workers), seconds, before.split("load average:")[-1].strip(),
                     after.split("load average:")[-1].strip()))
    runs = len(args.methods) * len(args.datasets) * len(args.protocols) * len(args.shots) * len(args.seeds)
    print(f"\n{runs} runs ({' '.join(args.methods)} | {' '.join(args.datasets)} | {' '.join(args.protocols)} | "
          f"shots {' '.join(args.shots)} | seeds {' '.join(args.seeds)}), demo configs, {args.model}, {cores} cores")
    print("| workers | threads per worker | wall time (s) | load before (1, 5, 15 min) | load after |")
    print("|---|---|---|---|---|")
    for w, t, s, b, a in rows:
        print(f"| {w} | {t} | {s:.1f} | {b} | {a} |")
    if len(rows) >= 2:
        print(f"speed-up {rows[0][0]} -> {rows[-1][0]} workers: {rows[0][2] / rows[-1][2]:.2f}x")


if __name__ == "__main__":
    main()
