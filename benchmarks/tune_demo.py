"""Choose the demo's HeBA hyper-parameters on held-out synthetic data (never on the demo's test images).

    python benchmarks/tune_demo.py [--out runs/tune] [--shots 16] [--seed 1] [--candidate "k=v k=v" ...]

Every synthetic dataset is generated a second time with another data seed (``--data-seed``, default
1000): new images of the same classes and style, none of them in the demo's splits. For each candidate
(space-separated key=value overrides of the HeBA base2new configuration) HeBA trains on the K-shot
sample of that copy's base classes and is scored, like base-to-new scores it, on all of the copy's
validation and test images of the base classes and of the new classes (40 per class with the default
sizes, four times the demo's validation split), next to zero-shot CLIP on the same images. The
candidate with the best mean harmonic mean goes into ``src/vladapt/configs/heba/demo.yaml``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

DEFAULT_CANDIDATES = [
    "",  # the paper's base-to-new configuration (30 epochs, lr 0.0075, scale 0.025, crops down to 8%)
    "train.crop_scale=[0.5,1.0]",
    "train.crop_scale=[0.5,1.0] method.scale=0.05 train.lr=0.03",
    "train.crop_scale=[0.5,1.0] method.scale=0.1 train.lr=0.03",
    "train.crop_scale=[0.5,1.0] method.scale=0.1 train.lr=0.1",
    "train.crop_scale=[1.0,1.0] method.scale=0.1 train.lr=0.1",
]


def main() -> None:
    import torch

    from vladapt.backbones import load_clip
    from vladapt.data import fewshot_splits, load_dataset, subsample_classes
    from vladapt.engine.runconfig import resolve_run_config
    from vladapt.engine.train import fit
    from vladapt.methods import create_method
    from vladapt.protocols.metrics import harmonic_mean
    from vladapt.protocols.runner import RunSettings, evaluate_items
    from vladapt.synth.datasets import DATASETS, DESCRIPTIONS, write_dataset

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/tune"))
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1, help="few-shot sampling and training seed")
    ap.add_argument("--data-seed", type=int, default=1000, help="seed of the held-out copy (the demo uses 0)")
    ap.add_argument("--model", default="vladapt-tiny")
    ap.add_argument("--datasets", nargs="+", default=sorted(DATASETS))
    ap.add_argument("--candidate", action="append", dest="candidates",
                    help="space-separated key=value overrides; repeat for several (default: a built-in list)")
    args = ap.parse_args()
    candidates = args.candidates or DEFAULT_CANDIDATES

    root = args.out / f"data-seed{args.data_seed}"
    backbone = load_clip(args.model)
    settings = RunSettings(backbone=backbone, root=root, method="heba", progress=False)
    rows = []
    for name in args.datasets:
        write_dataset(name, root, seed=args.data_seed)
        full = load_dataset(name, root)
        base = subsample_classes(fewshot_splits(full, args.shots, args.seed), "base")
        held = {half: subsample_classes(full, half) for half in ("base", "new")}
        held_out = {half: replace(s, test=[*s.val, *s.test]) for half, s in held.items()}

        def score(method) -> tuple[float, float, float]:
            accs = []
            for half, splits in held_out.items():
                accs.append(evaluate_items(settings, method, splits, name, half, split=half)["accuracy"])
            return accs[0], accs[1], harmonic_mean(*accs)

        zs_b, zs_n, zs_h = score(create_method("zeroshot", backbone, base.classnames))
        print(f"{name:<15} {'zero-shot CLIP':<62} base {zs_b:6.2f} new {zs_n:6.2f} HM {zs_h:6.2f}")
        for cand in candidates:
            method_cfg, train_cfg = resolve_run_config(
                "heba", "base2new", overrides=[f"method.descriptions={root / name / DESCRIPTIONS}", *cand.split()])
            torch.manual_seed(args.seed)
            heba = create_method("heba", backbone, base.classnames, method_cfg)
            heba.set_classnames(base.classnames, dataset=name, split="train")
            t0 = time.perf_counter()
            fit(heba, base, train_cfg, args.seed, progress=False)
            seconds = time.perf_counter() - t0
            b, n, h = score(heba)
            rows.append((name, cand, b, n, h, b - zs_b))
            print(f"{name:<15} {cand or '(base2new config)':<62} base {b:6.2f} new {n:6.2f} HM {h:6.2f} "
                  f"(base {b - zs_b:+.1f} over zero-shot; {seconds:.0f} s)", flush=True)
    print("\nheld-out copy, mean over datasets (and the smallest base gain over zero-shot):")
    print(f"  {'candidate':<62} {'base':>6} {'new':>6} {'HM':>6} {'min gain':>9}")
    for cand in candidates:
        mine = [r for r in rows if r[1] == cand]
        b, n, h = (sum(r[i] for r in mine) / len(mine) for i in (2, 3, 4))
        print(f"  {cand or '(base2new config)':<62} {b:6.2f} {n:6.2f} {h:6.2f} {min(r[5] for r in mine):+9.1f}")


if __name__ == "__main__":
    main()
