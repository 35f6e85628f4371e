"""PNG charts of result records."""

from __future__ import annotations

import io
from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Any

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
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=max(len(handles), 1), fontsize=8,
               frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
