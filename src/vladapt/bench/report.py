"""Result records on disk -> Markdown tables (means over seeds).

Training records and evaluations of trained checkpoints (``vladapt eval --checkpoint``, files
``*.eval.json``) are tabulated apart: an evaluation's rows name the method as
``heba (checkpoint eval)``. :func:`settings_table` lists, per group of runs, the settings that differ
from vladapt's packaged config of the method and protocol (``train.epochs=2``), so a short debug run
cannot pass for a full one.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from statistics import mean, pstdev
from typing import Any, Iterable

from vladapt.errors import DataError
from vladapt.protocols.metrics import average_base_new, harmonic_mean


def label(record: dict[str, Any]) -> str:
    """The method's name in tables: ``heba``, or ``heba (checkpoint eval)`` for an evaluation of a checkpoint."""
    return f"{record['method']} (checkpoint eval)" if record.get("checkpoint") else record["method"]


def load_records_with_paths(out_dir: str | Path) -> list[tuple[Path, Any]]:
    """``[(path, record)]`` of every result file under ``out_dir`` (``shots_*-seed_*.json`` and ``*.eval.json``)."""
    out = []
    for path in sorted(Path(out_dir).rglob("shots_*-seed_*.json")):
        try:
            out.append((path, json.loads(path.read_text())))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"result file {path} is not valid JSON ({e}); delete it or rerun that run") from e
    return out


def load_records(out_dir: str | Path) -> list[dict[str, Any]]:
    """Every result record under ``out_dir`` (files named ``shots_*-seed_*.json`` and ``*.eval.json``)."""
    return [record for _, record in load_records_with_paths(out_dir)]


def run_log(path: Path, record: dict[str, Any]) -> Path | None:
    """The run's ``log.jsonl``: in ``record['run_dir']``, or beside the record (results moved elsewhere)."""
    candidates = []
    if record.get("run_dir"):
        candidates.append(Path(record["run_dir"]) / "log.jsonl")
    candidates.append(path.parent / path.name.split(".")[0] / "log.jsonl")
    return next((c for c in candidates if c.is_file()), None)


def _fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{mean(values):.2f} ± {pstdev(values):.2f}"


def _group(records: Iterable[dict[str, Any]], protocol: str) -> dict[tuple[str, int], dict[str, list[dict]]]:
    """{(method, shots): {dataset: [records over seeds]}} for one protocol."""
    groups: dict[tuple[str, int], dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r["protocol"] == protocol:
            groups[(label(r), r["shots"])][r["dataset"]].append(r)
    return groups


def base2new_table(records: Iterable[dict[str, Any]]) -> str:
    """Per method: Base / New / HM per dataset (mean ± std over seeds) and the average rows."""
    out = []
    for (method, shots), by_ds in sorted(_group(records, "base2new").items()):
        out.append(f"### base-to-new: {method}, {shots} shots\n")
        out.append("| dataset | seeds | Base | New | HM |")
        out.append("|---|---|---|---|---|")
        rows = []
        for ds, recs in sorted(by_ds.items()):
            b = [r["results"]["base"]["accuracy"] for r in recs]
            n = [r["results"]["new"]["accuracy"] for r in recs]
            h = [harmonic_mean(x, y) for x, y in zip(b, n)]
            rows.append((mean(b), mean(n)))
            out.append(f"| {ds} | {len(recs)} | {_fmt(b)} | {_fmt(n)} | {_fmt(h)} |")
        if len(rows) > 1:
            avg = average_base_new(rows)
            out.append(f"| **average** (HM of mean Base and mean New) | | {avg['base']:.2f} | {avg['new']:.2f} | "
                       f"{avg['hm_of_means']:.2f} |")
            out.append(f"| average (mean of per-dataset HMs) | | | | {avg['mean_of_hms']:.2f} |")
        out.append("")
    return "\n".join(out)


def transfer_table(records: Iterable[dict[str, Any]], protocol: str) -> str:
    """Cross-dataset or DG: source accuracy, per-target accuracies and the target average."""
    out = []
    for (method, shots), by_ds in sorted(_group(records, protocol).items()):
        for source, recs in sorted(by_ds.items()):
            targets = list(recs[0]["results"]["targets"])
            out.append(f"### {protocol}: {method}, trained on {source}, {shots} shots\n")
            out.append("| seeds | " + " | ".join([source, *targets, "average (targets)"]) + " |")
            out.append("|" + "---|" * (len(targets) + 3))
            cells = [_fmt([r["results"]["source"][source]["accuracy"] for r in recs])]
            cells += [_fmt([r["results"]["targets"][t]["accuracy"] for r in recs]) for t in targets]
            cells.append(_fmt([r["results"]["average"] for r in recs]))
            out.append(f"| {len(recs)} | " + " | ".join(cells) + " |")
            out.append("")
    return "\n".join(out)


def fewshot_table(records: Iterable[dict[str, Any]]) -> str:
    by_method: dict[str, dict[str, dict[int, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in records:
        if r["protocol"] == "fewshot":
            by_method[label(r)][r["dataset"]][r["shots"]].append(r["results"]["test"]["accuracy"])
    out = []
    for method, by_ds in sorted(by_method.items()):
        shots = sorted({k for d in by_ds.values() for k in d})
        out.append(f"### few-shot: {method}\n")
        out.append("| dataset | " + " | ".join(f"{k} shots" for k in shots) + " |")
        out.append("|---|" + "---|" * len(shots))
        for ds, per_k in sorted(by_ds.items()):
            out.append(f"| {ds} | " + " | ".join(_fmt(per_k[k]) if k in per_k else "-" for k in shots) + " |")
        out.append("")
    return "\n".join(out)


def _flatten(d: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {f"{prefix}{k}": v for k, v in (d or {}).items()}


def _value(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, float):
        return f"{v:g}"
    return json.dumps(v)


def non_default_settings(record: dict[str, Any]) -> list[str] | None:
    """``["train.epochs=2", "method.scale=0.05"]``: the record's method and train settings that differ
    from vladapt's packaged config of its method and protocol (its defaults where none is packaged);
    ``None`` when the method is unknown here."""
    from vladapt.config import to_dict
    from vladapt.engine.runconfig import resolve_run_config
    from vladapt.errors import VladaptError

    try:
        method_cfg, train_cfg = resolve_run_config(record["method"], record["protocol"])
    except (VladaptError, OSError):
        return None
    default = {**_flatten(method_cfg, "method."), **_flatten(to_dict(train_cfg), "train.")}
    given = _flatten(record.get("method_config") or {}, "method.")
    if record.get("train_config") is not None:
        given.update(_flatten(record["train_config"], "train."))
    return [f"{k}={_value(v)}" for k, v in sorted(given.items()) if k in default and default[k] != v
            or k not in default]


def settings_table(records: Iterable[dict[str, Any]]) -> str:
    """One row per (protocol, method, dataset, shots) and distinct settings: the seeds run so and the
    settings that differ from the packaged config (``packaged config`` when none does)."""
    rows: dict[tuple, list[int]] = defaultdict(list)
    for r in records:
        diff = non_default_settings(r)
        text = "unknown method" if diff is None else ", ".join(f"`{d}`" for d in diff) or "packaged config"
        if not r.get("trained", True) and not diff:
            text = "packaged config (training-free)"
        if r.get("train_config") is None and r.get("trained"):
            text += " (train config not recorded)"
        if r.get("resumed_from_epoch"):
            text += f"; resumed from epoch {r['resumed_from_epoch']}"
        rows[(r["protocol"], label(r), r["dataset"], r["shots"], text)].append(r["seed"])
    if not rows:
        return ""
    out = ["### settings\n",
           "| protocol | method | dataset | shots | seeds | settings (differing from the packaged config) |",
           "|---|---|---|---|---|---|"]
    for (protocol, method, ds, shots, text), seeds in sorted(rows.items()):
        out.append(f"| {protocol} | {method} | {ds} | {shots} | {' '.join(map(str, sorted(seeds)))} | {text} |")
    out.append("")
    return "\n".join(out)


def markdown_report(records: list[dict[str, Any]]) -> str:
    parts = ["# vladapt results\n"]
    for protocol, table in (("base2new", base2new_table), ("cross_dataset", None), ("dg", None), ("fewshot", fewshot_table)):
        if any(r["protocol"] == protocol for r in records):
            parts.append(table(records) if table else transfer_table(records, protocol))
    settings = settings_table(records)
    if settings:
        parts.append(settings)
    parts.append("Accuracy in % (micro), mean ± population std over seeds. Dataset averages compare by the HM of "
                 "the mean Base and mean New accuracies (CoCoOp convention); the mean of per-dataset HMs is shown "
                 "for comparison with papers that use it. Transfer averages are over the target datasets only. "
                 "Rows named \"(checkpoint eval)\" are evaluations of trained checkpoints (`vladapt eval --checkpoint`, "
                 "`*.eval.json`), kept apart from the training records.\n")
    return "\n".join(parts)
