"""Every method on the embedded default, several seeds: base-to-new and all-class few-shot tables.

The evidence behind the README's method tables. For each method it runs, on the demo's synthetic
datasets (generated with the demo's data seed) and the bundled ``vladapt-tiny``:

* base-to-new at 16 shots (the methods that classify unseen classes), as ``vladapt demo`` does;
* all-class few-shot at each ``--shots`` value (every method),

with the method's ``demo`` run config when vladapt ships one (hyper-parameters chosen by
``benchmarks/tune_demo.py`` on a held-out copy of the datasets, never on these test images), else
the config of the protocol. Records already in ``--out`` are kept and not run again, so an
interrupted grid continues where it stopped. At the end it writes ``<out>/evidence.md``: mean ± std
over the seeds of Base / New / HM (base-to-new, averaged over the datasets as the demo does) and of
accuracy (few-shot), with each method's mean training time per run.

    python benchmarks/synthetic_evidence.py --out runs/evidence --seeds 1 2 3 --shots 1 4 16
    python benchmarks/synthetic_evidence.py --out runs/evidence --methods coop cocoop --protocols fewshot
    python benchmarks/synthetic_evidence.py --out runs/evidence --report-only
"""

from __future__ import annotations

import argparse
import json
import statistics as st
import sys
import time
from pathlib import Path

from vladapt.bench.bench import run_config
from vladapt.methods import list_methods
from vladapt.protocols.metrics import average_base_new

DATASETS = ["synth_counts", "synth_shapes", "synth_textures"]


def run(args) -> None:
    from vladapt.backbones import load_clip
    from vladapt.bench.grid import result_summary, run_grid
    from vladapt.engine.feature_cache import FeatureCache
    from vladapt.protocols.runner import RunSettings, record_path
    from vladapt.synth.datasets import description_overrides, write_dataset

    root = args.out / "data"
    for name in args.datasets:
        write_dataset(name, root, seed=0, per_class=(40, 10, 30), progress=False)
    backbone = load_clip("vladapt-tiny")
    features = FeatureCache(args.out / "features")
    registered = list_methods()
    jobs = []
    for method in args.methods:
        for protocol in args.protocols:
            if protocol == "base2new" and not getattr(registered[method].cls, "unseen_classes", True):
                continue  # a closed-set method (its README row says why)
            for k in ([16] if protocol == "base2new" else args.shots):
                for dataset in args.datasets:
                    for seed in args.seeds:
                        jobs.append((method, protocol, k, dataset, seed))
    todo = [j for j in jobs if not record_path(args.out / "records", dict(zip(
        ("method", "protocol", "shots", "dataset", "seed"), j))).is_file()]
    print(f"{len(jobs)} runs, {len(jobs) - len(todo)} already done", flush=True)
    t0 = time.perf_counter()
    for i, (method, protocol, k, dataset, seed) in enumerate(todo, 1):
        overrides = description_overrides(registered[method].cls.Config, dataset, root) + list(args.overrides)
        method_cfg, train_cfg = run_config(method, protocol, "demo", overrides)
        settings = RunSettings(backbone=backbone, root=root, method=method, method_config=method_cfg,
                               progress=False, feature_cache=features)
        (rec,) = run_grid(settings, protocol, dataset, [k], [seed], args.out / "records", train_config=train_cfg,
                          report=False)
        print(f"[{i}/{len(todo)}, {time.perf_counter() - t0:.0f} s] {method:<14} {protocol:<8} {k:>2} shots "
              f"{dataset:<15} seed {seed}: {result_summary(rec, 6)} ({rec['seconds']:.0f} s)", flush=True)


def _ms(xs: list[float]) -> str:
    return f"{st.fmean(xs):.1f} ± {st.stdev(xs):.1f}" if len(xs) > 1 else f"{xs[0]:.1f}"


def report(out: Path, datasets: list[str], order: list[str] = (), include: list[Path] = ()) -> str:
    recs = [json.loads(p.read_text()) for d in (out, *include) for p in sorted((d / "records").rglob("*.json"))]
    recs = [r for r in recs if isinstance(r, dict) and "results" in r and r.get("dataset") in datasets]
    found = {r["method"] for r in recs}
    methods = [m for m in order if m in found] + sorted(found - set(order))
    lines = ["# vladapt on the embedded default: every method, several seeds", "",
             f"Datasets: {', '.join(datasets)} (the demo's synthetic data, bundled vladapt-tiny). Mean ± std over "
             "seeds; each seed's value is first averaged over the datasets. Time: mean seconds per run "
             "(training and evaluation of one dataset and seed).", ""]
    b2n = [r for r in recs if r["protocol"] == "base2new"]
    if b2n:
        lines += ["## Base-to-new, 16 shots (average over datasets: Base / New / HM of the means)", "",
                  "| method | seeds | Base | New | HM | seconds per run |", "|---|---|---|---|---|---|"]
        for m in methods:
            rows = [r for r in b2n if r["method"] == m]
            seeds = sorted({r["seed"] for r in rows})
            per_seed = []
            for s in seeds:
                got = {r["dataset"]: r for r in rows if r["seed"] == s}
                if set(got) >= set(datasets):
                    per_seed.append(average_base_new([(got[d]["results"]["base"]["accuracy"],
                                                       got[d]["results"]["new"]["accuracy"]) for d in datasets]))
            if per_seed:
                lines.append(f"| {m} | {len(per_seed)} | {_ms([a['base'] for a in per_seed])} | "
                             f"{_ms([a['new'] for a in per_seed])} | {_ms([a['hm_of_means'] for a in per_seed])} | "
                             f"{st.fmean(r['seconds'] for r in rows):.0f} |")
        lines.append("")
    fs = [r for r in recs if r["protocol"] == "fewshot"]
    if fs:
        shots = sorted({r["shots"] for r in fs})
        lines += ["## All-class few-shot (accuracy averaged over datasets)", "",
                  "| method | seeds | " + " | ".join(f"{k} shots" for k in shots) + " | seconds per run (" +
                  ", ".join(str(k) for k in shots) + " shots) |", "|---|---|" + "---|" * (len(shots) + 1)]
        for m in methods:
            rows = [r for r in fs if r["method"] == m]
            if not rows:
                continue
            cells, secs, nseeds = [], [], set()
            for k in shots:
                vals = []
                for s in sorted({r["seed"] for r in rows}):
                    got = {r["dataset"]: r for r in rows if r["seed"] == s and r["shots"] == k}
                    if set(got) >= set(datasets):
                        vals.append(st.fmean(got[d]["results"]["test"]["accuracy"] for d in datasets))
                        nseeds.add(s)
                cells.append(_ms(vals) if vals else "-")
                t = [r["seconds"] for r in rows if r["shots"] == k]
                secs.append(f"{st.fmean(t):.0f}" if t else "-")
            lines.append(f"| {m} | {len(nseeds)} | " + " | ".join(cells) + f" | {', '.join(secs)} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/evidence"))
    ap.add_argument("--methods", nargs="+", default=sorted(list_methods()))
    ap.add_argument("--protocols", nargs="+", default=["base2new", "fewshot"], choices=["base2new", "fewshot"])
    ap.add_argument("--datasets", nargs="+", default=DATASETS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--shots", nargs="+", type=int, default=[1, 4, 16], help="few-shot K values")
    ap.add_argument("--report-only", action="store_true", help="only write the report of the records in --out")
    ap.add_argument("--include", type=Path, action="append", default=[],
                    help="also report the records of another --out folder (e.g. a grid run in parallel)")
    ap.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                    help="a config override for every run (repeat for several)")
    args = ap.parse_args()
    unknown = sorted(set(args.methods) - set(list_methods()))
    if unknown:
        sys.exit(f"unknown method(s) {unknown}; available: {sorted(list_methods())}")
    if not args.report_only:
        run(args)
    from vladapt.io import atomic_write_text

    text = report(args.out, args.datasets, args.methods, args.include)
    atomic_write_text(args.out / "evidence.md", text)
    print(text)


if __name__ == "__main__":
    main()
