"""``vladapt demo``: the whole pipeline on the embedded default, offline, on a CPU.

Generates the synthetic downstream datasets, loads the bundled tiny CLIP (``vladapt-tiny``), runs
zero-shot CLIP and every trainable method through base-to-new (few-shot sampling, training on the
base classes, evaluation on base and new), and writes the result records, a Markdown table and a
PNG bar chart. Each (method, dataset) runs through :func:`vladapt.bench.grid.run_grid`, the loop
behind ``vladapt train`` and ``vladapt eval``.

Trainable methods use their ``demo`` run config when vladapt ships one (hyper-parameters chosen by
``benchmarks/tune_demo.py`` on a copy of the synthetic datasets generated with another seed, never
on the demo's test images), else their ``base2new`` config.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vladapt.errors import ConfigError


# The project's own methods next to zero-shot CLIP; the baselines run with --methods NAME ... or all.
DEFAULT_METHODS = ("zeroshot", "heba", "mma", "rmadapter", "lathadapter")


@dataclass
class DemoSettings:
    out: Path = Path("runs/demo")
    methods: list[str] | None = None  # None: DEFAULT_METHODS; ["all"]: every method that does base-to-new
    datasets: list[str] | None = None  # None: every synthetic dataset
    seeds: list[int] = field(default_factory=lambda: [1])
    shots: int = 16
    model: str = "vladapt-tiny"
    per_class: tuple[int, int, int] = (40, 10, 30)
    data_seed: int = 0
    overrides: list[str] = field(default_factory=list)
    device: str = "cpu"
    progress: bool = True
    image_cache: str | Path | None = None  # decoded test images (vladapt.data.decoded); None or "none": off


def demo_run_config(method: str, overrides: list[str]):
    """(method config, TrainConfig) of a trainable method in the demo: its demo config, else base2new's."""
    from vladapt.bench.bench import run_config

    return run_config(method, "base2new", "demo", overrides)


def run_demo(s: DemoSettings) -> dict[str, Any]:
    """Run the demo; returns ``{"records": [...], "report": markdown, "chart": path, "seconds": ...}``."""
    from vladapt.backbones import load_clip
    from vladapt.bench.grid import result_summary, run_grid
    from vladapt.bench.plots import base2new_bar_chart
    from vladapt.bench.report import base2new_table
    from vladapt.io import atomic_write_text
    from vladapt.methods import list_methods
    from vladapt.protocols.runner import RunSettings
    from vladapt.synth.datasets import DATASETS, description_overrides, write_dataset

    t0 = time.perf_counter()
    registered = list_methods()
    if not s.methods:
        methods = list(DEFAULT_METHODS)
    elif s.methods == ["all"]:  # zero-shot and every method that classifies unseen classes (base-to-new)
        methods = ["zeroshot"] + [m for m, info in registered.items()
                                  if m != "zeroshot" and getattr(info.cls, "unseen_classes", True)]
    else:
        methods = list(s.methods)
    unknown = [m for m in methods if m not in registered]
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}; available: {sorted(registered)} (or 'all')")
    closed = [m for m in methods if not getattr(registered[m].cls, "unseen_classes", True)]
    if closed:
        raise ConfigError(f"{closed} cannot classify unseen classes, and the demo runs base-to-new; "
                          "run them with `vladapt eval/train --protocol fewshot`")
    datasets = s.datasets or sorted(DATASETS)
    unknown = [d for d in datasets if d not in DATASETS]
    if unknown:
        raise ConfigError(f"unknown synthetic dataset(s) {unknown}; available: {sorted(DATASETS)}")
    root = s.out / "data"
    for name in datasets:
        write_dataset(name, root, seed=s.data_seed, per_class=s.per_class, progress=s.progress)
    backbone = load_clip(s.model, device=s.device)

    def show(rec: dict[str, Any], path: Path) -> None:
        print(f"  {rec['method']:<10} {rec['dataset']:<15} seed {rec['seed']}: {result_summary(rec, 6)}  "
              f"({rec['seconds']:.0f} s)", flush=True)

    records = []
    # one cache for the whole demo: feature-level methods share their frozen features across seeds and methods
    from vladapt.data.decoded import image_cache_option
    from vladapt.engine.feature_cache import FeatureCache

    features = FeatureCache(s.out / "features")
    images = image_cache_option(s.image_cache)  # decoded test images, shared the same way (None: off)
    for method in methods:
        trainable = registered[method].trainable
        for dataset in datasets:
            overrides = list(s.overrides)
            if trainable:
                overrides[:0] = description_overrides(registered[method].cls.Config, dataset, root)
            method_cfg, train_cfg = demo_run_config(method, overrides) if trainable else ({}, None)
            settings = RunSettings(backbone=backbone, root=root, method=method, method_config=method_cfg,
                                   device=s.device, progress=s.progress, feature_cache=features,
                                   image_cache=images)
            records += run_grid(settings, "base2new", dataset, [s.shots], s.seeds, s.out / "records",
                                train_config=train_cfg, report=False, on_record=show if s.progress else None)
    report = "# vladapt demo\n\n" + _summary_table(records, methods, datasets) + "\n" + base2new_table(records)
    atomic_write_text(s.out / "report.md", report)
    chart = base2new_bar_chart(records, s.out / "base2new.png",
                               title=f"base-to-new on the synthetic benchmark ({s.model}, {s.shots} shots)")
    return {"records": records, "report": report, "chart": chart, "seconds": time.perf_counter() - t0}


def _summary_table(records: list[dict[str, Any]], methods: list[str], datasets: list[str]) -> str:
    """One row per method: Base/New/HM per dataset and the average (HM of mean Base and mean New)."""
    from statistics import mean

    from vladapt.protocols.metrics import average_base_new

    head = "| method | " + " | ".join(f"{d} B / N / HM" for d in datasets) + " | average B / N / HM |"
    lines = [head, "|---|" + "---|" * (len(datasets) + 1)]
    for m in methods:
        cells, rows = [], []
        for d in datasets:
            recs = [r for r in records if r["method"] == m and r["dataset"] == d]
            if not recs:
                cells.append("-")
                continue
            b = mean(r["results"]["base"]["accuracy"] for r in recs)
            n = mean(r["results"]["new"]["accuracy"] for r in recs)
            rows.append((b, n))
            avg = average_base_new([(b, n)])
            cells.append(f"{b:.1f} / {n:.1f} / {avg['hm_of_means']:.1f}")
        avg = average_base_new(rows) if rows else None
        cells.append(f"{avg['base']:.1f} / {avg['new']:.1f} / {avg['hm_of_means']:.1f}" if avg else "-")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
