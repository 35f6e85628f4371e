"""PNG charts of result records."""

from __future__ import annotations

import io
from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Any

from vladapt.bench.report import label, run_log
from vladapt.protocols.metrics import harmonic_mean


def base2new_bar_chart(records: list[dict[str, Any]], path: str | Path, title: str = "base-to-new") -> Path:
    """Grouped bars: one panel per dataset, Base / New / HM per method (means over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vladapt.io import atomic_write_bytes

    table: dict[str, dict[str, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r["protocol"] == "base2new":
            table[r["dataset"]][r["method"]].append((r["results"]["base"]["accuracy"], r["results"]["new"]["accuracy"]))
    datasets = sorted(table)
    methods = list(dict.fromkeys(r["method"] for r in records if r["protocol"] == "base2new"))  # run order
    fig, axes = plt.subplots(1, len(datasets), figsize=(max(4.2 * len(datasets), 6.5), 3.8), squeeze=False,
                             sharey=True)
    width = 0.8 / max(len(methods), 1)
    colors = plt.get_cmap("tab10")
    for ax, ds in zip(axes[0], datasets):
        for i, m in enumerate(methods):
            runs = table[ds].get(m)
            if not runs:
                continue
            b, n = mean(x for x, _ in runs), mean(y for _, y in runs)
            values = [b, n, harmonic_mean(b, n)]
            xs = [k + (i - (len(methods) - 1) / 2) * width for k in range(3)]
            bars = ax.bar(xs, values, width, label=m, color=colors(i))
            ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
        ax.set_xticks(range(3), ["Base", "New", "HM"])
        ax.set_title(ds)
        ax.set_ylim(0, 105)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("accuracy (%)")
    # One legend below the panels, where it cannot cover a bar or its label.
    handles = {}
    for ax in axes[0]:
        for handle, name in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(name, handle)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=max(len(handles), 1), fontsize=8,
               frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


# ---------------------------------------------------------------------------------------------------- report plots
# Used by ``vladapt report`` (vladapt.bench.paper): every function writes one PNG atomically and returns its path.

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    from vladapt.io import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    _pyplot().close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def _grid(plt, n: int, width: float = 4.0, height: float = 3.2):
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows + 0.6), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _legend_below(fig, axes) -> None:
    handles = {}
    for ax in axes:
        for handle, name in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(name, handle)
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(len(handles), 6), fontsize=8,
                   frameon=False)


def base2new_scatter(records: list[dict[str, Any]], path: str | Path, title: str = "Base vs New") -> Path:
    """One point per method and dataset: mean Base (x) against mean New (y) over seeds."""
    plt = _pyplot()
    pts: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    for r in records:
        if r["protocol"] == "base2new":
            pts[(label(r), r["dataset"])].append((r["results"]["base"]["accuracy"], r["results"]["new"]["accuracy"]))
    methods = sorted({m for m, _ in pts})
    datasets = sorted({d for _, d in pts})
    markers = "osD^v<>pP*Xh"
    colors = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    ax.plot([0, 100], [0, 100], color="#bbb", lw=0.8, zorder=0)
    for (m, d), runs in sorted(pts.items()):
        ax.scatter(mean(b for b, _ in runs), mean(n for _, n in runs), color=colors(methods.index(m) % 10),
                   marker=markers[datasets.index(d) % len(markers)], s=40, edgecolor="k", linewidth=0.4)
    for i, m in enumerate(methods):
        ax.scatter([], [], color=colors(i % 10), label=m)
    for j, d in enumerate(datasets):
        ax.scatter([], [], color="white", edgecolor="k", marker=markers[j % len(markers)], label=d)
    ax.set_xlabel("Base accuracy (%)")
    ax.set_ylabel("New accuracy (%)")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def fewshot_curves(records: list[dict[str, Any]], path: str | Path) -> Path:
    """Accuracy vs shots, one line per method (mean ± population std over seeds as error bars), one
    panel per dataset and a last panel with the mean over datasets."""
    from statistics import pstdev

    plt = _pyplot()
    acc: dict[str, dict[str, dict[int, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in records:
        if r["protocol"] == "fewshot":
            acc[r["dataset"]][label(r)][r["shots"]].append(r["results"]["test"]["accuracy"])
    datasets = sorted(acc)
    methods = sorted({m for d in acc.values() for m in d})
    panels = datasets + (["average over datasets"] if len(datasets) > 1 else [])
    fig, axes = _grid(plt, len(panels))
    colors = plt.get_cmap("tab10")
    for ax, panel in zip(axes, panels):
        for i, m in enumerate(methods):
            if panel in acc:
                per_k = acc[panel].get(m, {})
                ks = sorted(per_k)
                ys = [mean(per_k[k]) for k in ks]
                err = [pstdev(per_k[k]) for k in ks]
            else:  # mean over the method's datasets, at the shot counts all of them have (as the report's table)
                own = [d for d in datasets if m in acc[d]]
                ks = sorted(k for k in {k for d in own for k in acc[d][m]} if all(k in acc[d][m] for d in own))
                ys = [mean(mean(acc[d][m][k]) for d in own) for k in ks]
                err = None
                if len(own) < 2:
                    ks = []
            if ks:
                ax.errorbar(ks, ys, yerr=err, marker="o", ms=4, capsize=2, label=m, color=colors(i % 10))
        ax.set_xscale("log", base=2)
        ks_all = sorted({k for d in acc.values() for per in d.values() for k in per})
        ax.set_xticks(ks_all, [str(k) for k in ks_all])
        ax.set_xlabel("shots per class")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(panel, fontsize=10)
        ax.grid(alpha=0.3)
    _legend_below(fig, axes)
    fig.suptitle("few-shot accuracy vs shots", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return _save(fig, path)


def training_curves(runs: list[tuple[dict[str, Any], list[dict[str, Any]]]], path: str | Path,
                    title: str = "training loss") -> Path:
    """Loss per epoch from the runs' ``log.jsonl``: one line per run, coloured by method, one panel per
    dataset. ``runs`` holds ``(record, [epoch log lines])``."""
    plt = _pyplot()
    by_ds: dict[str, list] = defaultdict(list)
    for rec, lines in runs:
        by_ds[rec["dataset"]].append((rec, lines))
    datasets = sorted(by_ds)
    methods = sorted({label(rec) for rec, _ in runs})
    colors = plt.get_cmap("tab10")
    fig, axes = _grid(plt, len(datasets))
    for ax, ds in zip(axes, datasets):
        for rec, lines in sorted(by_ds[ds], key=lambda x: (label(x[0]), x[0]["shots"], x[0]["seed"])):
            pts = [(line["epoch"], line["loss"]) for line in lines if "epoch" in line and "loss" in line]
            if pts:
                ax.plot(*zip(*pts), color=colors(methods.index(label(rec)) % 10), lw=1, alpha=0.8,
                        label=label(rec))
        ax.set_title(ds, fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    _legend_below(fig, axes)
    fig.suptitle(f"{title} (one line per run: shots x seed)", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return _save(fig, path)


def report_plots(items: list[tuple[Path, dict[str, Any]]], out: str | Path) -> list[Path]:
    """Every plot of ``vladapt report`` for ``[(record path, record)]``, written under ``out``."""
    import json

    out = Path(out)
    records = [r for _, r in items]
    paths = []
    b2n = [r for r in records if r["protocol"] == "base2new"]
    for shots in sorted({r["shots"] for r in b2n}):
        sel = [dict(r, method=label(r)) for r in b2n if r["shots"] == shots]
        paths.append(base2new_bar_chart(sel, out / f"base2new_bars_{shots}shots.png",
                                        title=f"base-to-new, {shots} shots (means over seeds)"))
        paths.append(base2new_scatter(sel, out / f"base2new_scatter_{shots}shots.png",
                                      title=f"Base vs New, {shots} shots (one point per method and dataset)"))
    if any(r["protocol"] == "fewshot" for r in records):
        paths.append(fewshot_curves(records, out / "fewshot_curves.png"))
    logs: dict[str, list] = defaultdict(list)
    for path, rec in items:
        if rec.get("checkpoint"):  # an evaluation of a trained checkpoint: its training run is plotted already
            continue
        log = run_log(path, rec)
        if log is None:
            continue
        lines = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
        if lines:
            logs[rec["protocol"]].append((rec, lines))
    for protocol, runs in sorted(logs.items()):
        paths.append(training_curves(runs, out / f"training_curves_{protocol}.png",
                                     title=f"training loss, {protocol}"))
    return paths
