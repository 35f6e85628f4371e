"""Choose the demo's HeBA hyper-parameters on the synthetic VALIDATION splits (never on test).

    python benchmarks/tune_demo.py [--out runs/tune] [--shots 16] [--seed 1]

For each candidate (key=value overrides of the HeBA base2new config) it trains on the base classes of
every synthetic dataset and reports accuracy on the complete validation split of the base classes,
next to zero-shot CLIP on the same images. The chosen setting goes into
src/vladapt/configs/heba/demo.yaml.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

CANDIDATES = [
    [],  # the paper's base-to-new configuration (30 epochs, lr 0.0075, scale 0.025)
    ["train.lr=0.03"],
    ["train.lr=0.03", "method.scale=0.05"],
    ["train.epochs=15", "train.lr=0.03"],
]


def main() -> None:
    import torch

    from vladapt.backbones import load_clip
    from vladapt.data import fewshot_splits, load_dataset, subsample_classes
    from vladapt.engine.runconfig import resolve_run_config
    from vladapt.engine.train import fit
    from vladapt.methods import create_method
    from vladapt.protocols.runner import RunSettings, evaluate_items
    from vladapt.synth.datasets import DATASETS, DESCRIPTIONS, write_dataset

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("runs/tune"))
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--model", default="vladapt-tiny")
    args = ap.parse_args()

    root = args.out / "data"
    backbone = load_clip(args.model)
    settings = RunSettings(backbone=backbone, root=root, method="heba", progress=False)
    rows = []
    for name in sorted(DATASETS):
        write_dataset(name, root)
        full = load_dataset(name, root)
        few = fewshot_splits(full, args.shots, args.seed)
        base = subsample_classes(few, "base")
        base_val = replace(base, test=subsample_classes(full, "base").val)  # the complete base-class val split
        zs = create_method("zeroshot", backbone, base.classnames)
        acc_zs = evaluate_items(settings, zs, base_val, name, "zs", "base")["accuracy"]
        for cand in CANDIDATES:
            method_cfg, train_cfg = resolve_run_config(
                "heba", "base2new", overrides=[f"method.descriptions={root / name / DESCRIPTIONS}", *cand])
            torch.manual_seed(args.seed)
            heba = create_method("heba", backbone, base.classnames, method_cfg)
            heba.set_classnames(base.classnames, dataset=name, split="train")
            t0 = time.perf_counter()
            fit(heba, base, train_cfg, args.seed, progress=False)
            acc = evaluate_items(settings, heba, base_val, name, "heba", "base")["accuracy"]
            rows.append((name, " ".join(cand), acc_zs, acc, time.perf_counter() - t0))
            print(f"{name:<15} {' '.join(cand):<45} zero-shot {acc_zs:6.2f}  HeBA {acc:6.2f}  "
                  f"({rows[-1][-1]:.0f} s)", flush=True)
    print("\nmean over datasets (base-class validation accuracy):")
    for cand in CANDIDATES:
        key = " ".join(cand)
        accs = [r[3] for r in rows if r[1] == key]
        secs = sum(r[4] for r in rows if r[1] == key)
        print(f"  {key:<45} {sum(accs) / len(accs):6.2f}   training {secs:.0f} s for all datasets")


if __name__ == "__main__":
    main()
