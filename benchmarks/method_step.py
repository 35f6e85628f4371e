"""Training-step cost of adapter methods on ViT-B/16 (random weights), side by side: RMAdapter vs MMA, MMA vs HeBA,
LatHAdapter vs MMA.

    python benchmarks/method_step.py [--methods heba mma rmadapter] [--steps 3] [--batch 16] [--classes 50]
                                     [--threads N]

Each method runs with its base-to-new configuration, in fp32, in its own process (so peak RSS is
measured per configuration): ViT-B/16 with random weights (no download), a batch of ``--batch``
224x224 images of different classes out of ``--classes`` (MMA and RMAdapter put every class into
the step's text batch; HeBA's negative sampling, ratio 5, puts all 50 in with the defaults), SGD
built from the method's parameter groups. One warm-up step, then ``--steps`` timed steps
(forward, backward, optimizer step). Printed per method: wall-clock seconds per step (best and
median of the timed steps), process CPU seconds per step (less sensitive to other load on a shared
machine), images/s, peak RSS, RSS after loading (before the first step) and the trainable
parameters; then the ratios RMAdapter / MMA (the paper's Table 7: +5 % training time, +3 % GPU
memory), MMA / HeBA and LatHAdapter / MMA (LatHAdapter runs the image encoder without gradient and
back-propagates through the text encoder for its attribute prompts only). On a machine shared with other jobs use ``--threads 1``: two intra-op threads
that have to wait for each other's time slices spin and slow a step down many times over.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

PAPER = {"rmadapter/mma time": 1.05, "rmadapter/mma memory": 1.03}


def _rss_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024 ** 2
    return float("nan")


def child(method: str, steps: int, batch: int, classes: int, threads: int | None) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)

    from vladapt.backbones import load_clip
    from vladapt.engine.runconfig import resolve_run_config
    from vladapt.engine.train import autocast_context, build_optimizer
    from vladapt.methods import create_method
    from vladapt.methods.base import StepInfo

    torch.manual_seed(0)
    bb = load_clip("ViT-B-16-quickgelu", dtype=torch.float32)
    names = [f"class number {i}" for i in range(classes)]
    method_cfg, train_cfg = resolve_run_config(method, "base2new")
    m = create_method(method, bb, names, method_cfg)
    m.train()
    opt = build_optimizer(train_cfg, m.param_groups())
    images = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    labels = torch.randperm(classes, generator=torch.Generator().manual_seed(1))[:batch] % classes
    rss_loaded = _rss_gib()

    def step_fn(i: int):
        with autocast_context("fp32", "cpu"):
            out = m.training_step(images, labels, StepInfo.single(labels, seed=i, step=i))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        return out

    out = step_fn(0)  # warm-up
    wall, cpu = [], []
    for i in range(steps):
        w0, c0 = time.perf_counter(), time.process_time()
        step_fn(i + 1)
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # KiB -> GiB
    return {"method": method, "wall_best": min(wall), "wall_median": statistics.median(wall),
            "cpu_median": statistics.median(cpu), "images_per_second": batch / min(wall),
            "classes_in_step": int(out.logits.shape[1]), "loss_terms": sorted((out.extras or {"ce": 0}).keys()),
            "peak_rss_gib": peak, "rss_loaded_gib": rss_loaded,
            "trainable_parameters": m.num_trainable_parameters(), "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["heba", "mma", "rmadapter"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--classes", type=int, default=50)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--child")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.batch, args.classes, args.threads)))
        return
    rows = {}
    t0 = time.perf_counter()
    for method in args.methods:
        out = subprocess.run([sys.executable, __file__, "--child", method, "--steps", str(args.steps),
                              "--batch", str(args.batch), "--classes", str(args.classes),
                              *(["--threads", str(args.threads)] if args.threads else [])],
                             capture_output=True, text=True, check=True)
        rows[method] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  {method}: done ({json.dumps(rows[method])})", file=sys.stderr, flush=True)
    first = next(iter(rows.values()))
    print(f"ViT-B/16 (random weights), fp32, batch {args.batch} at 224 px, {args.classes} classes, base2new configs, "
          f"{first['threads']} threads; 1 warm-up + {args.steps} timed steps per method\n")
    print(f"| {'method':<10} | trainable params | loss terms | s/step (best) | s/step (median) | CPU s/step | "
          f"images/s | peak RSS GiB | RSS after load GiB |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows.values():
        print(f"| {r['method']:<10} | {r['trainable_parameters']:,} | {'+'.join(r['loss_terms'])} | {r['wall_best']:.2f} | "
              f"{r['wall_median']:.2f} | {r['cpu_median']:.2f} | {r['images_per_second']:.2f} | {r['peak_rss_gib']:.2f} | "
              f"{r['rss_loaded_gib']:.2f} |")
    pairs = [("rmadapter", "mma"), ("mma", "heba"), ("lathadapter", "mma")]
    print(f"\n| ratio | s/step (best) | CPU s/step | peak RSS | peak RSS above load | paper |")
    print("|---|---:|---:|---:|---:|---|")
    for a, b in pairs:
        if a in rows and b in rows:
            x, y = rows[a], rows[b]
            paper = (f"time {PAPER[f'{a}/{b} time']:.2f}, memory {PAPER[f'{a}/{b} memory']:.2f} (GPU)"
                     if f"{a}/{b} time" in PAPER else "-")
            above = (x["peak_rss_gib"] - x["rss_loaded_gib"]) / (y["peak_rss_gib"] - y["rss_loaded_gib"])
            print(f"| {a} / {b} | {x['wall_best'] / y['wall_best']:.3f} | {x['cpu_median'] / y['cpu_median']:.3f} | "
                  f"{x['peak_rss_gib'] / y['peak_rss_gib']:.3f} | {above:.3f} | {paper} |")
    print(f"\n{time.perf_counter() - t0:.0f} s in all")


if __name__ == "__main__":
    main()
