"""``vladapt report``: paper-style tables (Markdown, CSV, LaTeX, HTML), published numbers and plots.

The records are written by hand with numbers whose means, population stds and HMs are computed here
independently of vladapt.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from vladapt.bench.paper import write_report
from vladapt.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def hm(b, n):
    return 2 * b * n / (b + n)


def pmean(xs):
    return sum(xs) / len(xs)


def pstd(xs):  # population std, as vladapt's tables
    m = pmean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


# (method, dataset) -> [(seed, base, new)]
B2N = {
    ("coop", "eurosat"): [(1, 90.0, 50.0), (2, 94.0, 56.0)],
    ("coop", "synth_shapes"): [(1, 60.0, 40.0), (2, 70.0, 40.0)],
    ("clip_adapter", "eurosat"): [(1, 80.0, 70.0)],
}
# (method, dataset) -> {shots: [accuracy per seed]}
FEWSHOT = {
    ("coop", "synth_shapes"): {1: [40.0, 50.0], 4: [60.0, 62.0]},
    ("coop", "synth_counts"): {1: [30.0, 30.0], 4: [70.0, 80.0]},
}
XD_TARGETS = {"caltech101": [(1, 95.0), (2, 91.0)], "eurosat": [(1, 40.0), (2, 50.0)]}
LOSSES = [2.0, 1.5, 1.2]


def write(root: Path, rec: dict) -> Path:
    path = root / rec["protocol"] / rec["method"] / rec["dataset"] / f"shots_{rec['shots']}-seed_{rec['seed']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec))
    return path


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("results")
    for (method, ds), runs in B2N.items():
        for seed, b, n in runs:
            path = write(root, {"method": method, "protocol": "base2new", "dataset": ds, "shots": 16, "seed": seed,
                                "results": {"base": {"accuracy": b}, "new": {"accuracy": n}, "hm": hm(b, n)},
                                "train_config": {"epochs": 3}, "seconds": 1.0})
            if method == "coop":  # a run folder beside the record, as vladapt train writes it
                run_dir = path.with_suffix("")
                run_dir.mkdir()
                run_dir.joinpath("log.jsonl").write_text("".join(
                    json.dumps({"epoch": e + 1, "loss": loss + seed / 10, "accuracy": 50.0, "lr": 0.1}) + "\n"
                    for e, loss in enumerate(LOSSES)))
    # an evaluation of coop's eurosat seed-1 checkpoint (vladapt eval --checkpoint): its own rows, no training curve
    path = root / "base2new/coop/eurosat/shots_16-seed_1.eval.json"
    path.write_text(json.dumps({"method": "coop", "protocol": "base2new", "dataset": "eurosat", "shots": 16, "seed": 1,
                                "checkpoint": str(path.with_name("shots_16-seed_1") / "checkpoint"),
                                "results": {"base": {"accuracy": 89.0}, "new": {"accuracy": 51.0}}}))
    for (method, ds), per_k in FEWSHOT.items():
        for shots, accs in per_k.items():
            for seed, acc in enumerate(accs, 1):
                write(root, {"method": method, "protocol": "fewshot", "dataset": ds, "shots": shots, "seed": seed,
                             "results": {"test": {"accuracy": acc}}})
    for seed in (1, 2):
        targets = {t: {"accuracy": dict(v)[seed]} for t, v in XD_TARGETS.items()}
        write(root, {"method": "coop", "protocol": "cross_dataset", "dataset": "imagenet", "shots": 16, "seed": seed,
                     "results": {"source": {"imagenet": {"accuracy": 70.0 + seed}}, "targets": targets,
                                 "average": pmean([t["accuracy"] for t in targets.values()])}})
    return root


@pytest.fixture(scope="module")
def report(results, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("report")
    paths = write_report(results, out, published=True)
    return {p.name: p for p in paths}


def csv_rows(path: Path) -> dict[tuple, dict]:
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    keyed = {(r["method"], r["protocol"], r["dataset"], int(r["shots"]), r["metric"]): r for r in rows}
    assert len(keyed) == len(rows), "one CSV row per (method, protocol, dataset, shots, metric)"
    return keyed


def test_csv_has_one_tidy_row_per_metric_with_hand_computed_numbers(report):
    rows = csv_rows(report["report.csv"])
    expected = set()
    for (m, ds) in B2N:
        expected |= {(m, "base2new", ds, 16, k) for k in ("base", "new", "hm")}
    expected |= {("coop", "base2new", "average", 16, k) for k in ("base", "new", "hm_of_means", "mean_of_hms")}
    expected |= {("coop (checkpoint eval)", "base2new", "eurosat", 16, k) for k in ("base", "new", "hm")}
    for (m, ds), per_k in FEWSHOT.items():
        expected |= {(m, "fewshot", ds, k, "accuracy") for k in per_k}
    expected |= {("coop", "fewshot", "average", k, "accuracy") for k in (1, 4)}
    expected |= {("coop", "cross_dataset", "imagenet", 16, "source_accuracy"),
                 ("coop", "cross_dataset", "average", 16, "average")}
    expected |= {("coop", "cross_dataset", t, 16, "accuracy") for t in XD_TARGETS}
    assert set(rows) == expected
    assert list(csv.reader(io.StringIO(report["report.csv"].read_text())))[0][:8] == [
        "method", "protocol", "dataset", "shots", "metric", "mean", "std", "n_seeds"]

    def check(key, mean_, std_, n):
        row = rows[key]
        assert float(row["mean"]) == pytest.approx(mean_, abs=1e-9), key
        assert (row["std"] == "") if std_ is None else float(row["std"]) == pytest.approx(std_, abs=1e-9), key
        assert int(row["n_seeds"]) == n, key

    per_ds = {}
    for (m, ds), runs in B2N.items():
        b, n = [r[1] for r in runs], [r[2] for r in runs]
        h = [hm(x, y) for x, y in zip(b, n)]
        check((m, "base2new", ds, 16, "base"), pmean(b), pstd(b), len(runs))
        check((m, "base2new", ds, 16, "new"), pmean(n), pstd(n), len(runs))
        check((m, "base2new", ds, 16, "hm"), pmean(h), pstd(h), len(runs))
        if m == "coop":
            per_ds[ds] = (pmean(b), pmean(n))
    check(("coop (checkpoint eval)", "base2new", "eurosat", 16, "base"), 89.0, 0.0, 1)
    mb, mn = pmean([b for b, _ in per_ds.values()]), pmean([n for _, n in per_ds.values()])
    check(("coop", "base2new", "average", 16, "base"), mb, None, 2)
    check(("coop", "base2new", "average", 16, "new"), mn, None, 2)
    check(("coop", "base2new", "average", 16, "hm_of_means"), hm(mb, mn), None, 2)  # 78.5 / 46.5
    check(("coop", "base2new", "average", 16, "mean_of_hms"), pmean([hm(b, n) for b, n in per_ds.values()]), None, 2)
    assert hm(mb, mn) != pytest.approx(pmean([hm(b, n) for b, n in per_ds.values()]), abs=0.01)  # kinds differ
    for (m, ds), per_k in FEWSHOT.items():
        for k, accs in per_k.items():
            check((m, "fewshot", ds, k, "accuracy"), pmean(accs), pstd(accs), 2)
    for k in (1, 4):
        check(("coop", "fewshot", "average", k, "accuracy"),
              pmean([pmean(FEWSHOT[("coop", ds)][k]) for ds in ("synth_shapes", "synth_counts")]), None, 2)
    check(("coop", "cross_dataset", "imagenet", 16, "source_accuracy"), 71.5, 0.5, 2)
    check(("coop", "cross_dataset", "caltech101", 16, "accuracy"), 93.0, 2.0, 2)
    check(("coop", "cross_dataset", "average", 16, "average"), pmean([67.5, 70.5]), 1.5, 2)


def test_markdown_shows_mean_std_and_both_labelled_averages(report):
    md = report["report.md"].read_text()
    # coop on eurosat: Base 92 ± 2, New 53 ± 3, HM mean ± population std of the per-seed HMs
    h = [hm(90, 50), hm(94, 56)]
    assert f"| coop | 2 | 92.00 ± 2.00 | 53.00 ± 3.00 | {pmean(h):.2f} ± {pstd(h):.2f} |" in md
    assert "| clip_adapter | 1 | 80.00 | 70.00 | 74.67 |" in md  # one seed: its value, no std
    hom = hm(78.5, 46.5)
    moh = pmean([hm(92, 53), hm(65, 40)])
    assert "| method | datasets | Base | New | HM of means | mean of HMs |" in md
    assert f"| coop | 2 | 78.50 | 46.50 | {hom:.2f} | {moh:.2f} |" in md
    assert "population std" in md and "HM(mean Base, mean New)" in md
    assert "### cross-dataset transfer, trained on imagenet, 16 shots" in md
    assert "| coop | 2 | 71.50 ± 0.50 | 93.00 ± 2.00 | 45.00 ± 5.00 | 69.00 ± 1.50 |" in md
    assert "| coop | 45.00 ± 5.00 | 61.00 ± 1.00 |" in md  # few-shot, synth_shapes: 1 and 4 shots


def test_published_columns_show_differences_and_dashes(report):
    md = report["report.md"].read_text()
    # METHODS.md §4.13: CoOp on EuroSAT 92.19 / 54.74 / 68.69 [RMA-AAAI Table 1]
    ours_hm = pmean([hm(90, 50), hm(94, 56)])
    row = next(line for line in md.splitlines() if line.startswith("| coop | 2 | 92.00"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[5:11] == ["92.19", "54.74", "68.69", f"{92 - 92.19:+.2f}", f"{53 - 54.74:+.2f}",
                           f"{ours_hm - 68.69:+.2f}"]
    assert "RMA-AAAI" in cells[11]
    # clip_adapter: no published base-to-new numbers
    row = next(line for line in md.splitlines() if line.startswith("| clip_adapter | 1 |"))
    assert [c.strip() for c in row.strip("|").split("|")][5:11] == ["–"] * 6
    # synthetic datasets say so
    row = next(line for line in md.splitlines() if line.startswith("| coop | 2 | 65.00"))
    assert "no published numbers (synthetic dataset)" in row and row.count("–") == 6
    # the average over {eurosat, synth_shapes} is not the published 11-dataset average
    row = next(line for line in md.splitlines() if line.startswith("| coop | 2 | 78.50"))
    assert "82.69" not in row and "–" in row
    # cross-dataset: CoOp caltech101 93.70 published [RMA-AAAI Table 2]; ours 93.00
    assert re.search(r"\| coop: Δ \(ours − published\) \|  \| -0\.01 \| -0\.70 \| [-+]\d", md)
    rows = csv_rows(report["report.csv"])
    r = rows[("coop", "base2new", "eurosat", 16, "base")]
    assert float(r["published"]) == 92.19 and float(r["diff"]) == pytest.approx(92 - 92.19)
    r = rows[("clip_adapter", "base2new", "eurosat", 16, "base")]
    assert r["published"] == "" and r["diff"] == "" and r["published_source"] == "not published"
    assert rows[("coop", "base2new", "synth_shapes", 16, "hm")]["published_source"] == \
        "no published numbers (synthetic dataset)"


def test_published_file_holds_only_the_spec_numbers():
    """Spot checks against METHODS.md (§1.14, §2.7, §4.12, §4.13)."""
    from vladapt.bench.paper import load_published

    pub = load_published()["methods"]
    assert pub["rmadapter"]["base2new"]["average"] == {"base": 84.52, "new": 77.36, "hm": 80.62,
                                                       "source": "RMA-AAAI"}
    assert pub["heba"]["base2new"]["average"]["hm"] == 81.35 and "base" not in pub["heba"]["base2new"]["average"]
    assert pub["mma"]["dg"]["targets"]["imagenet_r"] == 77.32
    assert pub["zeroshot"]["base2new"]["datasets"]["fgvc_aircraft"] == [27.19, 36.29, 31.09]
    assert "clip_adapter" not in pub and "tip_adapter" not in pub  # n/r in METHODS.md


def test_latex_is_booktabs_and_escapes_names(report):
    tex = report["report.tex"].read_text()
    assert r"\usepackage{booktabs}" in tex and tex.count(r"\toprule") == tex.count(r"\bottomrule") > 0
    assert r"clip\_adapter" in tex and r"synth\_shapes" in tex and r"mean\_of" not in tex
    assert not re.search(r"(?<!\\)_", tex), "every _ is escaped"
    assert "±" not in tex and r"$\pm$" in tex and "–" not in tex


def test_plots_are_valid_pngs(report):
    from PIL import Image

    names = {n for n in report if n.endswith(".png")}
    assert names == {"base2new_bars_16shots.png", "base2new_scatter_16shots.png", "fewshot_curves.png",
                     "training_curves_base2new.png"}
    for name in names:
        data = report[name].read_bytes()
        assert len(data) > 0 and data[:8] == PNG_MAGIC, name
        with Image.open(report[name]) as im:
            im.verify()
        with Image.open(report[name]) as im:
            assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
    assert not list(report["report.md"].parent.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_training_curves_plot_the_logged_losses(results, tmp_path, monkeypatch):
    """The loss-per-epoch plot reads each run's log.jsonl: one line per run, the logged values."""
    from vladapt.bench import plots

    seen, real = [], plots.training_curves

    def spy(runs, path, title=""):
        seen.append(runs)
        return real(runs, path, title)

    monkeypatch.setattr(plots, "training_curves", spy)
    items = [(p, json.loads(p.read_text())) for p in sorted(results.rglob("shots_*-seed_*.json"))]
    plots.report_plots(items, tmp_path)
    (runs,) = seen
    assert sorted((r["dataset"], r["seed"], [x["loss"] for x in lines]) for r, lines in runs) == sorted(
        (ds, seed, [loss + seed / 10 for loss in LOSSES]) for (m, ds), rs in B2N.items() if m == "coop"
        for seed, _, _ in rs)


class _Dom(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: dict[str, list[dict]] = {}

    def handle_starttag(self, tag, attrs):
        self.tags.setdefault(tag, []).append(dict(attrs))


def test_html_is_self_contained(report):
    page = report["report.html"].read_text()
    dom = _Dom()
    dom.feed(page)
    assert "script" not in dom.tags and "link" not in dom.tags
    assert not re.search(r"(src|href)\s*=\s*[\"'](?!data:)", page), "no external resources"
    assert len(dom.tags["img"]) == len([n for n in report if n.endswith(".png")])


def _chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def _run_chromium(binary: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
                           *args], capture_output=True, text=True, timeout=120)


def _console(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def test_html_report_in_headless_chromium(report, tmp_path):
    binary = _chromium()
    if binary is None:
        pytest.skip("no chromium binary on PATH (install Debian's chromium: apt-get install -y chromium)")
    from PIL import Image

    # the console capture works: a page logging an error is seen
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>console.error('vladapt-probe')</script></body></html>")
    assert any("vladapt-probe" in line for line in _console(_run_chromium(binary, "--dump-dom", bad.as_uri()).stderr))

    url = report["report.html"].as_uri()
    res = _run_chromium(binary, "--dump-dom", url)
    assert res.returncode == 0, res.stderr[-2000:]
    assert _console(res.stderr) == []
    dom = _Dom()
    dom.feed(res.stdout)
    tables = len(re.findall(r"^### ", report["report.md"].read_text(), re.M))
    assert len(dom.tags.get("table", [])) == tables > 0
    assert len(dom.tags.get("td", [])) > 20
    pngs = sorted(n for n in report if n.endswith(".png"))
    imgs = dom.tags.get("img", [])
    assert len(imgs) == len(pngs)
    for img in imgs:
        assert img["src"].startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1]))) as im:
            im.verify()

    shot = tmp_path / "report_screenshot.png"
    res = _run_chromium(binary, f"--screenshot={shot}", "--window-size=1400,4000", url)
    assert res.returncode == 0 and _console(res.stderr) == []
    assert shot.read_bytes()[:8] == PNG_MAGIC and shot.stat().st_size > 10_000
    print(f"screenshot of the HTML report: {shot}")


def test_cli_report(results, tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["report", str(results), "--out", str(out), "--formats", "csv", "tex"]) == 0
    printed = capsys.readouterr().out.split()
    assert str(out / "report.csv") in printed and str(out / "report.tex") in printed
    assert not (out / "report.md").exists() and not (out / "report.html").exists()
    assert all(Path(p).is_file() for p in printed)
    assert "published" not in (out / "report.csv").read_text().splitlines()[0]  # only with --published


def test_cli_report_without_records_names_the_folder(tmp_path, capsys):
    empty = tmp_path / "no_records_here"
    empty.mkdir()
    (empty / "notes.json").write_text("{}")
    assert main(["report", str(empty)]) == 2
    err = capsys.readouterr().err
    assert "no result records" in err and str(empty) in err
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert str(tmp_path / "missing") in capsys.readouterr().err


def test_published_averages_compare_only_over_the_benchmark_sets(tmp_path):
    """MMA on the 11 base-to-new datasets and the 4 DG targets: the published averages (METHODS.md §4.6:
    83.20 / 76.80 / 79.87, DG 60.48) appear with ours − published."""
    from vladapt.bench.paper import B2N_DATASETS
    from vladapt.protocols.metrics import DG_TARGETS

    for ds in B2N_DATASETS:
        write(tmp_path, {"method": "mma", "protocol": "base2new", "dataset": ds, "shots": 16, "seed": 1,
                         "results": {"base": {"accuracy": 80.0}, "new": {"accuracy": 70.0}}})
    for ds in ("eurosat", "dtd"):  # CoOp on 2 of the 11: its average is not the published one
        write(tmp_path, {"method": "coop", "protocol": "base2new", "dataset": ds, "shots": 16, "seed": 1,
                         "results": {"base": {"accuracy": 80.0}, "new": {"accuracy": 70.0}}})
    accs = dict(zip(DG_TARGETS, (60.0, 50.0, 40.0, 70.0)))
    write(tmp_path, {"method": "mma", "protocol": "dg", "dataset": "imagenet", "shots": 16, "seed": 1,
                     "results": {"source": {"imagenet": {"accuracy": 72.0}},
                                 "targets": {t: {"accuracy": a} for t, a in accs.items()}, "average": 55.0}})
    paths = write_report(tmp_path, tmp_path / "out", formats=["csv"], published=True, plots=False)
    rows = csv_rows(paths[0])
    for metric, pub in (("base", 83.20), ("new", 76.80), ("hm_of_means", 79.87)):
        r = rows[("mma", "base2new", "average", 16, metric)]
        assert float(r["published"]) == pub and float(r["diff"]) == pytest.approx(float(r["mean"]) - pub)
    assert rows[("mma", "base2new", "average", 16, "mean_of_hms")]["published"] == ""
    assert float(rows[("mma", "base2new", "average", 16, "hm_of_means")]["mean"]) == pytest.approx(hm(80, 70))
    r = rows[("coop", "base2new", "average", 16, "base")]
    assert r["published"] == "" and r["diff"] == "" and "11" in r["published_source"]
    assert float(rows[("coop", "base2new", "eurosat", 16, "base")]["published"]) == 92.19
    r = rows[("mma", "dg", "average", 16, "average")]
    assert float(r["published"]) == 60.48 and float(r["diff"]) == pytest.approx(55.0 - 60.48)
    r = rows[("mma", "dg", "imagenet_r", 16, "accuracy")]
    assert float(r["published"]) == 77.32 and float(r["diff"]) == pytest.approx(70.0 - 77.32)
    assert float(rows[("mma", "dg", "imagenet", 16, "source_accuracy")]["published"]) == 71.00
