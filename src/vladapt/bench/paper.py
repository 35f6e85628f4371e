"""Paper-style reports of a results folder: ``vladapt report RESULTS_DIR``.

:func:`tidy_rows` turns result records into one row per (method, protocol, dataset, shots, metric)
with the mean, the population std over seeds (as :mod:`vladapt.bench.report`) and the number of seeds;
:func:`build_tables` lays those rows out as paper tables (one per dataset, methods as rows), and the
renderers write them as Markdown, CSV, LaTeX (booktabs) and one self-contained HTML page with the
PNG plots of :mod:`vladapt.bench.plots` embedded. ``published=True`` adds the numbers METHODS.md
reports (``published.yaml``) and our difference to each (ours − published).
"""

from __future__ import annotations

import base64
import csv
import html
import io
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean, pstdev
from typing import Any, Iterable

from vladapt.bench import report
from vladapt.bench.report import label
from vladapt.errors import DataError
from vladapt.protocols.metrics import CROSS_DATASET_TARGETS, DG_TARGETS, average_base_new, harmonic_mean

FORMATS = ("md", "csv", "tex", "html")
DASH = "–"
CSV_FIELDS = ["method", "protocol", "dataset", "shots", "metric", "mean", "std", "n_seeds"]
PUBLISHED_FIELDS = ["published", "diff", "published_source"]
STD_NOTE = ("Accuracy in % (micro); cells are mean ± population std over seeds (a single seed: its value). "
            "Per-dataset HM: mean ± std over seeds of each seed's HM(Base, New).")
AVERAGE_NOTE = ("Dataset averages use the per-dataset mean Base and New: \"HM of means\" is HM(mean Base, mean "
                "New), the CoCoOp convention and the number to compare; \"mean of HMs\" is the mean over datasets "
                "of HM(mean Base, mean New) of each dataset, which some papers print instead.")
# The 11 base-to-new datasets; the published averages cover exactly these.
B2N_DATASETS = ("imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
                "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101")


# ----------------------------------------------------------------------------------------------- records

def load_records_with_paths(results_dir: str | Path) -> list[tuple[Path, dict[str, Any]]]:
    """``[(path, record)]`` of every result record under ``results_dir``; a clear error when there is none."""
    root = Path(results_dir)
    if not root.is_dir():
        raise DataError(f"results folder {root} does not exist (give the --out folder of vladapt train/eval/bench)")
    keys = {"method", "protocol", "dataset", "shots", "seed", "results"}
    out = [(p, r) for p, r in report.load_records_with_paths(root) if isinstance(r, dict) and keys <= set(r)]
    if not out:
        raise DataError(f"no result records in {root} (files <protocol>/<method>/<dataset>/shots_K-seed_S.json "
                        "written by vladapt train / eval / bench)")
    return out


# ----------------------------------------------------------------------------------------------- published

def load_published(path: str | Path | None = None) -> dict[str, Any]:
    import yaml

    path = Path(path) if path is not None else Path(__file__).with_name("published.yaml")
    return yaml.safe_load(path.read_text())


def _synthetic(dataset: str) -> bool:
    return dataset.startswith("synth")


@dataclass
class Published:
    """Look-ups in ``published.yaml``: ``value(...)`` is ``(number, source)`` or ``(None, reason)``."""

    data: dict[str, Any]

    def setting(self) -> str:
        s = self.data.get("setting", {})
        return f"{s.get('backbone', '?')}, {s.get('shots', '?')} shots"

    def source_text(self, tag: str) -> str:
        return f"{tag}: {self.data.get('sources', {}).get(tag, tag)}"

    def value(self, method: str, protocol: str, dataset: str, metric: str, shots: int,
              datasets: Iterable[str] = ()) -> tuple[float | None, str]:
        """``dataset`` is ``"average"`` for an average row; ``datasets`` then lists what ours averages over."""
        if _synthetic(dataset) or (dataset == "average" and any(_synthetic(d) for d in datasets)):
            return None, "no published numbers (synthetic dataset)"
        if shots != self.data.get("setting", {}).get("shots", 16):
            return None, f"published at {self.data.get('setting', {}).get('shots', 16)} shots only"
        entry = self.data.get("methods", {}).get(method.split(" (")[0], {}).get(protocol)
        if not entry:
            return None, "not published"
        if protocol == "base2new":
            if dataset == "average":
                avg = entry.get("average") or {}
                if set(datasets) != set(B2N_DATASETS):
                    return None, "published average covers the 11 benchmark datasets"
                key = {"hm_of_means": "hm"}.get(metric, metric)
                return (avg[key], avg["source"]) if avg.get(key) is not None else (None, "not published")
            per = entry.get("datasets") or {}
            row = per.get(dataset)
            idx = {"base": 0, "new": 1, "hm": 2}.get(metric)
            if row is None or idx is None or row[idx] is None:
                return None, "not published"
            return row[idx], per["source"]
        # cross_dataset / dg
        src = entry.get("source", "?")
        if metric == "average":
            if entry.get("average") is None:
                return None, "not published"
            expected = set(CROSS_DATASET_TARGETS if protocol == "cross_dataset" else DG_TARGETS)
            if set(datasets) != expected:
                return None, f"published average covers the {len(expected)} standard targets"
            return entry["average"], src
        table = entry.get("source_accuracy" if metric == "source_accuracy" else "targets") or {}
        if table.get(dataset) is None:
            return None, "not published"
        return table[dataset], src


# ----------------------------------------------------------------------------------------------- tidy rows

def _stats(values: list[float]) -> tuple[float, float, int]:
    return mean(values), pstdev(values), len(values)


def tidy_rows(records: Iterable[dict[str, Any]], published: Published | None = None) -> list[dict[str, Any]]:
    """One dict per (method, protocol, dataset, shots, metric): ``mean``, ``std`` (population, over
    seeds; ``None`` for averages over datasets) and ``n_seeds`` (for averages: the fewest seeds of the
    datasets averaged). With ``published``: ``published``, ``diff`` (ours − published) and
    ``published_source`` (the source, or why there is no published number)."""
    groups: dict[tuple[str, str, int], dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        groups[(label(r), r["protocol"], r["shots"])][r["dataset"]].append(r)
    rows: list[dict[str, Any]] = []

    def add(method, protocol, dataset, shots, metric, m, s, n, datasets=()):
        row = {"method": method, "protocol": protocol, "dataset": dataset, "shots": shots, "metric": metric,
               "mean": m, "std": s, "n_seeds": n}
        if published is not None:
            value, source = published.value(method, protocol, dataset, metric, shots, datasets)
            row.update(published=value, diff=None if value is None else m - value, published_source=source)
        rows.append(row)

    for (method, protocol, shots), by_ds in sorted(groups.items()):
        if protocol == "base2new":
            means = []
            for ds, recs in sorted(by_ds.items()):
                b = [r["results"]["base"]["accuracy"] for r in recs]
                n = [r["results"]["new"]["accuracy"] for r in recs]
                h = [harmonic_mean(x, y) for x, y in zip(b, n)]
                for metric, values in (("base", b), ("new", n), ("hm", h)):
                    add(method, protocol, ds, shots, metric, *_stats(values))
                means.append((mean(b), mean(n)))
            if len(by_ds) > 1:
                avg = average_base_new(means)
                fewest = min(len(v) for v in by_ds.values())
                for metric in ("base", "new", "hm_of_means", "mean_of_hms"):
                    add(method, protocol, "average", shots, metric, avg[metric], None, fewest, list(by_ds))
        elif protocol in ("cross_dataset", "dg"):
            for source, recs in sorted(by_ds.items()):
                add(method, protocol, source, shots, "source_accuracy",
                    *_stats([r["results"]["source"][source]["accuracy"] for r in recs]))
                targets = list(recs[0]["results"]["targets"])
                for t in targets:
                    add(method, protocol, t, shots, "accuracy",
                        *_stats([r["results"]["targets"][t]["accuracy"] for r in recs]))
                add(method, protocol, "average", shots, "average",
                    *_stats([r["results"]["average"] for r in recs]), targets)
        elif protocol == "fewshot":
            for ds, recs in sorted(by_ds.items()):
                add(method, protocol, ds, shots, "accuracy",
                    *_stats([r["results"]["test"]["accuracy"] for r in recs]))
    # few-shot averages over datasets, per method and shots: only where the method has every one of
    # its few-shot datasets at that shot count (an average over fewer datasets would not compare)
    fs: dict[tuple[str, int], list[dict]] = defaultdict(list)
    fs_datasets: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        if row["protocol"] == "fewshot":
            fs[(row["method"], row["shots"])].append(row)
            fs_datasets[row["method"]].add(row["dataset"])
    for (method, shots), rs in sorted(fs.items()):
        if len(rs) > 1 and len(rs) == len(fs_datasets[method]):
            add(method, "fewshot", "average", shots, "accuracy", mean(r["mean"] for r in rs), None,
                min(r["n_seeds"] for r in rs), [r["dataset"] for r in rs])
    return rows


# ----------------------------------------------------------------------------------------------- tables

@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return DASH
    if row["std"] is None or row["n_seeds"] == 1:
        return f"{row['mean']:.2f}"
    return f"{row['mean']:.2f} ± {row['std']:.2f}"


def _pub(row: dict[str, Any] | None) -> str:
    if row is None or row.get("published") is None:
        return DASH
    return f"{row['published']:.2f}"


def _diff(row: dict[str, Any] | None) -> str:
    if row is None or row.get("diff") is None:
        return DASH
    return f"{row['diff']:+.2f}"


def _why(rows: list[dict[str, Any] | None]) -> str:
    """The sources of the published numbers of a table row, or why there are none."""
    texts = list(dict.fromkeys(r["published_source"] for r in rows if r is not None))
    have = [r for r in rows if r is not None and r.get("published") is not None]
    if have:
        return "; ".join(dict.fromkeys(r["published_source"] for r in have))
    return "; ".join(texts) or "not published"


def build_tables(rows: list[dict[str, Any]], published: Published | None = None) -> dict[str, list[Table]]:
    """``{section title: [Table]}`` in report order."""
    pub = published is not None
    idx = {(r["method"], r["protocol"], r["dataset"], r["shots"], r["metric"]): r for r in rows}
    sections: dict[str, list[Table]] = {}

    def keys(protocol):
        return sorted({(r["shots"], r["dataset"]) for r in rows if r["protocol"] == protocol})

    def methods(protocol, shots):
        return sorted({r["method"] for r in rows if r["protocol"] == protocol and r["shots"] == shots})

    # base-to-new: one table per dataset (methods as rows), then the averages
    tables = []
    b2n_shots = sorted({s for s, _ in keys("base2new")})
    for shots in b2n_shots:
        datasets = sorted({d for s, d in keys("base2new") if s == shots and d != "average"})
        for ds in datasets:
            header = ["method", "seeds", "Base", "New", "HM"]
            if pub:
                header += ["pub. Base", "pub. New", "pub. HM", "Δ Base", "Δ New", "Δ HM", "published source"]
            t = Table(f"base-to-new, {ds}, {shots} shots", header)
            for m in methods("base2new", shots):
                cells = [idx.get((m, "base2new", ds, shots, k)) for k in ("base", "new", "hm")]
                if cells[0] is None:
                    continue
                line = [m, str(cells[0]["n_seeds"]), *map(_cell, cells)]
                if pub:
                    line += [*map(_pub, cells), *map(_diff, cells), _why(cells)]
                t.rows.append(line)
            tables.append(t)
        avg_methods = [m for m in methods("base2new", shots) if (m, "base2new", "average", shots, "base") in idx]
        if avg_methods:
            header = ["method", "datasets", "Base", "New", "HM of means", "mean of HMs"]
            if pub:
                header += ["pub. Base", "pub. New", "pub. HM", "Δ Base", "Δ New", "Δ HM (HM of means)",
                           "published source"]
            t = Table(f"base-to-new, average over datasets, {shots} shots", header, notes=[AVERAGE_NOTE])
            for m in avg_methods:
                cells = [idx[(m, "base2new", "average", shots, k)] for k in ("base", "new", "hm_of_means",
                                                                              "mean_of_hms")]
                n_ds = len({r["dataset"] for r in rows if r["method"] == m and r["protocol"] == "base2new"
                            and r["shots"] == shots and r["dataset"] != "average"})
                line = [m, str(n_ds), *map(_cell, cells)]
                if pub:
                    line += [*map(_pub, cells[:3]), *map(_diff, cells[:3]), _why(cells[:3])]
                t.rows.append(line)
            tables.append(t)
    if tables:
        sections["Base-to-new generalization"] = tables

    # cross-dataset and DG: methods as rows, source + targets + average as columns
    for protocol, title in (("cross_dataset", "Cross-dataset transfer"), ("dg", "Domain generalization")):
        tables = []
        for shots in sorted({r["shots"] for r in rows if r["protocol"] == protocol}):
            sources = sorted({r["dataset"] for r in rows if r["protocol"] == protocol and r["shots"] == shots
                              and r["metric"] == "source_accuracy"})
            for source in sources:
                ms = [m for m in methods(protocol, shots) if (m, protocol, source, shots, "source_accuracy") in idx]
                targets = list(dict.fromkeys(r["dataset"] for r in rows if r["protocol"] == protocol
                                             and r["shots"] == shots and r["metric"] == "accuracy"
                                             and r["method"] in ms))
                cols = [(source, "source_accuracy"), *((t, "accuracy") for t in targets), ("average", "average")]
                header = ["method", "seeds", f"{source} (source)", *targets, "average (targets)"]
                t = Table(f"{title.lower()}, trained on {source}, {shots} shots", header,
                          notes=["Averages are over the target datasets only."])
                for m in ms:
                    cells = [idx.get((m, protocol, d, shots, k)) for d, k in cols]
                    t.rows.append([m, str(cells[0]["n_seeds"]), *map(_cell, cells)])
                    if pub:
                        t.rows.append([f"{m}: published", "", *map(_pub, cells)])
                        t.rows.append([f"{m}: Δ (ours − published)", "", *map(_diff, cells)])
                        t.rows.append([f"{m}: published source", "", _why(cells), *[""] * (len(cols) - 1)])
                tables.append(t)
        if tables:
            sections[title] = tables

    # few-shot: one table per dataset and the average, methods as rows, shots as columns
    fs = [r for r in rows if r["protocol"] == "fewshot"]
    if fs:
        tables = []
        shots_all = sorted({r["shots"] for r in fs})
        datasets = sorted({r["dataset"] for r in fs} - {"average"}) + (["average"] if any(
            r["dataset"] == "average" for r in fs) else [])
        for ds in datasets:
            t = Table(f"few-shot, {ds}" if ds != "average" else "few-shot, average over datasets",
                      ["method", *(f"{k} shots" for k in shots_all)])
            if ds == "average":
                t.notes.append("Mean over the datasets of each method's per-dataset means at that shot count; "
                               "\"–\" where the method lacks one of its datasets at that shot count.")
            for m in sorted({r["method"] for r in fs if r["dataset"] == ds}):
                t.rows.append([m, *(_cell(idx.get((m, "fewshot", ds, k, "accuracy"))) for k in shots_all)])
            tables.append(t)
        sections["Few-shot classification (all classes)"] = tables
    return sections


# ----------------------------------------------------------------------------------------------- renderers

def _notes(published: Published | None, rows: list[dict[str, Any]]) -> list[str]:
    notes = [STD_NOTE, AVERAGE_NOTE]
    if published is not None:
        notes.append(f"Published numbers: {published.setting()}, as reported in the literature and collected in "
                     "METHODS.md (vladapt/bench/published.yaml); Δ = ours − published; \"–\" = no published number.")
        synth = sorted({r["dataset"] for r in rows if _synthetic(r["dataset"])})
        if synth:
            notes.append(f"No published numbers exist for the synthetic datasets ({', '.join(synth)}).")
        tags = sorted({r["published_source"] for r in rows if r.get("published") is not None})
        notes += [f"Source {published.source_text(tag)}" for tag in tags]
    notes.append("Rows named \"(checkpoint eval)\" are evaluations of trained checkpoints (*.eval.json).")
    return notes


def render_markdown(sections: dict[str, list[Table]], notes: list[str], images: list[Path] = ()) -> str:
    def esc(text: str) -> str:
        return text.replace("|", "\\|")

    out = ["# vladapt results\n"]
    for title, tables in sections.items():
        out.append(f"## {title}\n")
        for t in tables:
            out.append(f"### {t.title}\n")
            out.append("| " + " | ".join(map(esc, t.header)) + " |")
            out.append("|" + "---|" * len(t.header))
            out += ["| " + " | ".join(map(esc, row)) + " |" for row in t.rows]
            out.append("")
            out += [f"{n}\n" for n in t.notes if n != AVERAGE_NOTE]
    if images:
        out.append("## Plots\n")
        out += [f"![{p.stem}]({p.name})\n" for p in images]
    out.append("## Notes\n")
    out += [f"* {n}" for n in notes]
    return "\n".join(out) + "\n"


def render_csv(rows: list[dict[str, Any]], published: bool) -> str:
    buf = io.StringIO()
    fields = CSV_FIELDS + (PUBLISHED_FIELDS if published else [])
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else repr(r[k]) if isinstance(r.get(k), float) else r[k])
                    for k in fields})
    return buf.getvalue()


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", "Δ": r"$\Delta$",
        "–": "--", "−": "-"}


def tex_escape(text: str) -> str:
    return "".join(_TEX.get(c, c) for c in text)


def render_latex(sections: dict[str, list[Table]], notes: list[str]) -> str:
    out = [r"\documentclass{article}", r"\usepackage[margin=1.5cm,landscape]{geometry}", r"\usepackage{booktabs}",
           r"\usepackage[T1]{fontenc}", r"\begin{document}", r"\section*{vladapt results}"]
    for title, tables in sections.items():
        out.append(rf"\subsection*{{{tex_escape(title)}}}")
        for t in tables:
            out += [r"\begin{table}[h]", r"\centering", r"\scriptsize",
                    rf"\caption{{{tex_escape(t.title)}}}",
                    r"\begin{tabular}{l" + "r" * (len(t.header) - 1) + "}", r"\toprule",
                    " & ".join(tex_escape(h) for h in t.header) + r" \\", r"\midrule"]
            out += [" & ".join(tex_escape(c) for c in row) + r" \\" for row in t.rows]
            out += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    out.append(r"\paragraph{Notes.}")
    out += [tex_escape(n) + r"\par" for n in notes]
    out.append(r"\end{document}")
    return "\n".join(out) + "\n"


_CSS = """body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:.5em 0 1.5em}
th,td{border-bottom:1px solid #ccc;padding:3px 8px;text-align:right;font-size:13px}th{border-bottom:2px solid #444}
td:first-child,th:first-child{text-align:left}caption{font-weight:bold;text-align:left;padding:4px 0}
img{max-width:100%;border:1px solid #eee;margin:.5em 0}figure{margin:0 0 1.5em}p.note{font-size:12px;color:#555}"""


def render_html(sections: dict[str, list[Table]], notes: list[str], images: list[tuple[str, bytes]]) -> str:
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           "<title>vladapt results</title>", f"<style>{_CSS}</style></head><body>", "<h1>vladapt results</h1>"]
    for title, tables in sections.items():
        out.append(f"<h2>{e(title)}</h2>")
        for t in tables:
            out.append(f"<table><caption>{e(t.title)}</caption><thead><tr>"
                       + "".join(f"<th>{e(h)}</th>" for h in t.header) + "</tr></thead><tbody>")
            out += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in t.rows]
            out.append("</tbody></table>")
            out += [f'<p class="note">{e(n)}</p>' for n in t.notes if n != AVERAGE_NOTE]
    if images:
        out.append("<h2>Plots</h2>")
        for name, data in images:
            uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
            out.append(f'<figure><img src="{uri}" alt="{e(name)}"><figcaption>{e(name)}</figcaption></figure>')
    out.append("<h2>Notes</h2><ul>" + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------- entry point

def write_report(results_dir: str | Path, out: str | Path | None = None, formats: Iterable[str] = FORMATS,
                 published: bool = False, plots: bool = True) -> list[Path]:
    """Write ``report.{md,csv,tex,html}`` (those in ``formats``) and the PNG plots to ``out``
    (default ``RESULTS_DIR/report``); returns the paths written."""
    from vladapt.bench import plots as P
    from vladapt.io import atomic_write_text

    formats = list(dict.fromkeys(formats))
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise DataError(f"unknown report format(s) {', '.join(bad)}; choose from {', '.join(FORMATS)}")
    items = load_records_with_paths(results_dir)
    records = [r for _, r in items]
    out = Path(out) if out is not None else Path(results_dir) / "report"
    pub = Published(load_published()) if published else None
    rows = tidy_rows(records, pub)
    sections = build_tables(rows, pub)
    notes = _notes(pub, rows)
    images: list[Path] = []
    if plots:
        images = P.report_plots(items, out)
    written: list[Path] = []
    if "md" in formats:
        written.append(atomic_write_text(out / "report.md", render_markdown(sections, notes, images)))
    if "csv" in formats:
        written.append(atomic_write_text(out / "report.csv", render_csv(rows, published)))
    if "tex" in formats:
        written.append(atomic_write_text(out / "report.tex", render_latex(sections, notes)))
    if "html" in formats:
        page = render_html(sections, notes, [(p.name, p.read_bytes()) for p in images])
        written.append(atomic_write_text(out / "report.html", page))
    return written + images
