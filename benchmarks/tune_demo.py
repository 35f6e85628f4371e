"""Choose a method's demo hyper-parameters on held-out synthetic data (never on the demo's test images).

    python benchmarks/tune_demo.py [--method heba] [--out runs/tune] [--shots 16] [--seeds 1 ...]
                                   [--common "k=v k=v"] [--candidate "k=v k=v" ...]

Every synthetic dataset is generated a second time with another data seed (``--data-seed``, default
1000): new images of the same classes and style, none of them in the demo's splits. For each candidate
(space-separated key=value overrides of the method's base2new configuration, applied after the
``--common`` overrides) the method trains on the K-shot sample of that copy's base classes and is
scored, like base-to-new scores it, on all of the copy's validation and test images of the base
classes and of the new classes (40 per class with the default sizes, four times the demo's
validation split), next to zero-shot CLIP on the same images. With several ``--seeds`` each
candidate is trained once per seed (few-shot sample and training seed) and the summary averages
over seeds (with the standard deviation of the mean HM across seeds). The candidate with the best
mean harmonic mean goes into ``src/vladapt/configs/<method>/demo.yaml``.

Built-in candidate lists (``--candidate`` replaces them):

* heba: the list that chose ``configs/heba/demo.yaml``;
* mma: a coarse grid over the branch scale and the learning rate (blocks from 1, whole-image views);
* rmadapter: MMA's demo values (kept identical) with the reconstruction and consistency weights varied;
* lathadapter: learning rate, residual ratios, epochs and zero-shot fusion around the base2new
  configuration, all with whole-image views;
* coop: the learning rate over two decades at 50 epochs (a quarter of the published 200), whole-image views;
* cocoop: batch 8 (the published batch 1 as a reference point) with the learning rate scaled and the
  number of epochs varied, whole-image views.

The same command with other ``--candidate`` lists runs ablations on the held-out copy (the README's
LatHAdapter ablation: one candidate per switched-off term or changed design choice).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path

DEFAULT_CANDIDATES = {
    "heba": [
        "",  # the paper's base-to-new configuration (30 epochs, lr 0.0075, scale 0.025, crops down to 8%)
        "train.crop_scale=[0.5,1.0]",
        "train.crop_scale=[0.5,1.0] method.scale=0.05 train.lr=0.03",
        "train.crop_scale=[0.5,1.0] method.scale=0.1 train.lr=0.03",
        "train.crop_scale=[0.5,1.0] method.scale=0.1 train.lr=0.1",
        "train.crop_scale=[1.0,1.0] method.scale=0.1 train.lr=0.1",
    ],
    # MMA's base2new config adapts blocks 5..12, which the tiny model (4 + 3 blocks) does not have:
    # the first candidate is that config with only the block range changed.
    "mma": [
        "method.adapter_start=1",
        "method.adapter_start=1 train.crop_scale=[1.0,1.0] method.scale=0.01 train.lr=0.01",
        "method.adapter_start=1 train.crop_scale=[1.0,1.0] method.scale=0.01 train.lr=0.1",
        "method.adapter_start=1 train.crop_scale=[1.0,1.0] method.scale=0.05 train.lr=0.05",
        "method.adapter_start=1 train.crop_scale=[1.0,1.0] method.scale=0.1 train.lr=0.01",
        "method.adapter_start=1 train.crop_scale=[1.0,1.0] method.scale=0.1 train.lr=0.1",
    ],
    # RMAdapter: the MMA part stays at MMA's demo values (the --common default below); only what
    # RMAdapter adds varies: reconstruction weights (lambda1 = lambda2) and consistency weights.
    "rmadapter": [
        "method.rec_visual_weight=1 method.rec_text_weight=1 method.con_image_weight=10 method.con_text_weight=25",
        "method.rec_visual_weight=0.1 method.rec_text_weight=0.1 method.con_image_weight=10 method.con_text_weight=25",
        "method.rec_visual_weight=1 method.rec_text_weight=1 method.con_image_weight=1 method.con_text_weight=2.5",
        "method.rec_visual_weight=0.1 method.rec_text_weight=0.1 method.con_image_weight=1 method.con_text_weight=2.5",
    ],
    # LatHAdapter (whole-image views as the common start, see DEFAULT_COMMON): the reference design's
    # learning rate, residual ratios, epochs and the zero-shot fusion at inference.
    "lathadapter": [
        "",
        "method.visual_ratio=0.5 method.text_ratio=0.5",
        "train.lr=0.003",
        "method.zeroshot_weight=1.0",
        "method.visual_ratio=0.5 method.text_ratio=0.5 train.lr=0.003",
        "train.epochs=50 method.visual_ratio=0.1 method.text_ratio=0.1",
    ],
    # CoOp and CoCoOp (whole-image views as the common start, see DEFAULT_COMMON).
    "coop": [
        "train.epochs=50 train.lr=0.002",
        "train.epochs=50 train.lr=0.02",
        "train.epochs=50 train.lr=0.2",
    ],
    "cocoop": [
        "train.batch_size=1",  # the published batch, lr 0.002 and 10 epochs: 1,280 steps on 8 x 16 images
        "train.batch_size=8 train.lr=0.016",  # 8x the batch, 8x the lr (linear scaling), 10 epochs
        "train.batch_size=8 train.lr=0.1",
        "train.batch_size=8 train.lr=0.1 train.epochs=30",
    ],
}
# Overrides every candidate of a method starts from (``--common`` replaces them).
DEFAULT_COMMON = {
    "rmadapter": "MMA_DEMO",  # resolved to MMA's demo.yaml method/train values (see common_overrides)
    "lathadapter": "train.crop_scale=[1.0,1.0]",
    "coop": "train.crop_scale=[1.0,1.0]",
    "cocoop": "train.crop_scale=[1.0,1.0]",
}
# The keys of MMA's demo config that RMAdapter inherits, so both run the same adaptation branch and training.
MMA_KEYS = ("adapter_start", "adapter_end", "towers", "dim", "scale", "shared", "activation", "neg_sampling_ratio",
            "label_smoothing", "text_prefix")
TRAIN_KEYS = ("optimizer", "lr", "momentum", "weight_decay", "epochs", "batch_size", "scheduler", "warmup_epochs",
              "crop_scale")


def _value(v) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_value(x) for x in v) + "]"
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def common_overrides(method: str, common: str | None) -> list[str]:
    """The overrides every candidate starts from: ``--common`` if given, else the method's default."""
    if common is not None:
        return common.split()
    if DEFAULT_COMMON.get(method) != "MMA_DEMO":
        return DEFAULT_COMMON.get(method, "").split()
    from vladapt.engine.runconfig import packaged_config, resolve_run_config

    if packaged_config("mma", "demo") is None:
        raise SystemExit("rmadapter is tuned on top of MMA's demo config: write configs/mma/demo.yaml first "
                         "(or pass --common)")
    mcfg, tcfg = resolve_run_config("mma", "demo")
    return ([f"method.{k}={_value(mcfg[k])}" for k in MMA_KEYS]
            + [f"train.{k}={_value(getattr(tcfg, k))}" for k in TRAIN_KEYS])


def main() -> None:
    import torch

    from vladapt.backbones import load_clip
    from vladapt.data import fewshot_splits, load_dataset, subsample_classes
    from vladapt.engine.runconfig import resolve_run_config
    from vladapt.engine.train import fit
    from vladapt.methods import create_method, list_methods
    from vladapt.protocols.metrics import harmonic_mean
    from vladapt.protocols.runner import RunSettings, evaluate_items
    from vladapt.synth.datasets import DATASETS, DESCRIPTIONS, write_dataset

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="heba", help="the trainable method to tune (default heba)")
    ap.add_argument("--out", type=Path, default=Path("runs/tune"))
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--seed", "--seeds", dest="seeds", type=int, nargs="+", default=[1],
                    help="few-shot sampling and training seed(s)")
    ap.add_argument("--data-seed", type=int, default=1000, help="seed of the held-out copy (the demo uses 0)")
    ap.add_argument("--model", default="vladapt-tiny")
    ap.add_argument("--datasets", nargs="+", default=sorted(DATASETS))
    ap.add_argument("--common", default=None,
                    help="space-separated key=value overrides applied before every candidate's "
                         "(default: none; for rmadapter MMA's demo values, for lathadapter, coop and cocoop "
                         "whole-image views)")
    ap.add_argument("--candidate", action="append", dest="candidates",
                    help="space-separated key=value overrides; repeat for several (default: a built-in list)")
    args = ap.parse_args()
    method = args.method
    registered = list_methods()
    if method not in registered or not registered[method].trainable:
        raise SystemExit(f"--method must be a trainable method: {sorted(m for m, i in registered.items() if i.trainable)}")
    if args.data_seed == 0:
        raise SystemExit("data seed 0 is the demo's: tune on a held-out copy")
    candidates = args.candidates or DEFAULT_CANDIDATES.get(method)
    if not candidates:
        raise SystemExit(f"no built-in candidates for {method}: pass --candidate")
    common = common_overrides(method, args.common)
    takes_descriptions = "descriptions" in registered[method].cls.Config.__dataclass_fields__

    root = args.out / f"data-seed{args.data_seed}"
    backbone = load_clip(args.model)
    settings = RunSettings(backbone=backbone, root=root, method=method, progress=False)
    print(f"tuning {method} on the held-out copy (data seed {args.data_seed}), {args.shots} shots, "
          f"seeds {args.seeds}; common overrides: {' '.join(common) or '(none)'}", flush=True)
    rows = []  # (dataset, candidate, seed, base, new, hm, base gain over zero-shot, seconds)
    t_all = time.perf_counter()
    for name in args.datasets:
        write_dataset(name, root, seed=args.data_seed)
        full = load_dataset(name, root)
        held = {half: subsample_classes(full, half) for half in ("base", "new")}
        held_out = {half: replace(s, test=[*s.val, *s.test]) for half, s in held.items()}

        def score(m) -> tuple[float, float, float]:
            accs = []
            for half, splits in held_out.items():
                accs.append(evaluate_items(settings, m, splits, name, half, split=half)["accuracy"])
            return accs[0], accs[1], harmonic_mean(*accs)

        zs_b, zs_n, zs_h = score(create_method("zeroshot", backbone, held["base"].classnames))
        print(f"{name:<15} {'zero-shot CLIP':<62} base {zs_b:6.2f} new {zs_n:6.2f} HM {zs_h:6.2f}")
        for seed in args.seeds:
            base = subsample_classes(fewshot_splits(full, args.shots, seed), "base")
            for cand in candidates:
                extra = [f"method.descriptions={root / name / DESCRIPTIONS}"] if takes_descriptions else []
                method_cfg, train_cfg = resolve_run_config(method, "base2new", overrides=[*extra, *common, *cand.split()])
                torch.manual_seed(seed)
                m = create_method(method, backbone, base.classnames, method_cfg)
                m.set_classnames(base.classnames, dataset=name, split="train")
                t0 = time.perf_counter()
                fit(m, base, train_cfg, seed, progress=False)
                seconds = time.perf_counter() - t0
                b, n, h = score(m)
                rows.append((name, cand, seed, b, n, h, b - zs_b, seconds))
                seed_note = f"seed {seed}; " if len(args.seeds) > 1 else ""
                print(f"{name:<15} {cand or '(base2new config)':<62} base {b:6.2f} new {n:6.2f} HM {h:6.2f} "
                      f"(base {b - zs_b:+.1f} over zero-shot; {seed_note}{seconds:.0f} s)", flush=True)
    many = len(args.seeds) > 1
    w = max(62, *(len(c) for c in candidates))
    print(f"\n{method}, held-out copy, mean over datasets{' and seeds' if many else ''} "
          f"(and the smallest base gain over zero-shot{'; HM sd over seeds' if many else ''}):")
    print(f"  {'candidate':<{w}} {'base':>6} {'new':>6} {'HM':>6} {'min gain':>9}" + (f" {'HM sd':>6}" if many else ""))
    for cand in candidates:
        mine = [r for r in rows if r[1] == cand]
        b, n, h = (statistics.fmean(r[i] for r in mine) for i in (3, 4, 5))
        line = f"  {cand or '(base2new config)':<{w}} {b:6.2f} {n:6.2f} {h:6.2f} {min(r[6] for r in mine):+9.1f}"
        if many:
            per_seed = [statistics.fmean(r[5] for r in mine if r[2] == s) for s in args.seeds]
            line += f" {statistics.stdev(per_seed):6.2f}"
        print(line)
    print(f"\n{len(rows)} trainings, {time.perf_counter() - t_all:.0f} s in all")


if __name__ == "__main__":
    main()
