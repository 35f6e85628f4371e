"""The library's entry points: ``run_grid`` (the loop behind train / eval / demo) and ``vladapt.*``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import vladapt
from vladapt.bench.grid import result_summary, run_grid, summary_line
from vladapt.cli import main
from vladapt.engine.precision import storage_dtype
from vladapt.errors import ConfigError
from vladapt.protocols.runner import RunSettings


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("grid") / "imgs"
    assert main(["synth", "folder", str(out), "--per-class", "8"]) == 0
    return out


def records_under(out) -> dict[str, dict]:
    """{relative path: record without its timing fields}."""
    recs = {}
    for p in sorted(out.rglob("*.json")):
        rec = json.loads(p.read_text())
        recs[str(p.relative_to(out))] = {k: v for k, v in rec.items() if k not in ("seconds", "created")}
    return recs


def test_run_grid_writes_the_records_the_cli_writes(folder, tmp_path, capsys):
    cli_out, lib_out = tmp_path / "cli", tmp_path / "lib"
    assert main(["eval", "--method", "zeroshot", "--protocol", "base2new", "--dataset", "folder", "--root", str(folder),
                 "--model", "vladapt-test-tiny", "--shots", "2", "--seeds", "1", "2", "--out", str(cli_out),
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    # the CLI's default precision is auto (bf16 on a CPU with native bf16): the library gets the same backbone
    settings = RunSettings(backbone=vladapt.load_clip("vladapt-test-tiny", dtype=storage_dtype("auto")), root=folder,
                           method="zeroshot", progress=False)
    seen = []
    records = run_grid(settings, "base2new", "folder", shots=[2], seeds=[1, 2], out=lib_out,
                       on_record=lambda rec, path: seen.append(path))
    assert [(r["shots"], r["seed"]) for r in records] == [(2, 1), (2, 2)]
    assert seen == [lib_out / "base2new/zeroshot/folder" / f"shots_2-seed_{s}.json" for s in (1, 2)]
    assert set(records_under(cli_out)) == {f"base2new/zeroshot/folder/shots_2-seed_{s}.json" for s in (1, 2)}
    assert records_under(lib_out) == records_under(cli_out)
    assert (lib_out / "report.md").read_text() == (cli_out / "report.md").read_text()
    assert "run_dir" not in records[0] and "checkpoint" not in records[0]  # nothing was trained
    for rec in records:  # the CLI printed the library's summary line of each record
        path = cli_out / "base2new/zeroshot/folder" / f"shots_2-seed_{rec['seed']}.json"
        assert f"{summary_line(rec)}  -> {path}\n" in printed
    assert (lib_out / "report.md").read_text() in printed
    assert not list(lib_out.rglob(".*.tmp"))


def test_shots_below_one_are_refused_before_any_work(folder, tmp_path):
    # the CLI's default precision is auto (bf16 on a CPU with native bf16): the library gets the same backbone
    settings = RunSettings(backbone=vladapt.load_clip("vladapt-test-tiny", dtype=storage_dtype("auto")), root=folder,
                           method="zeroshot", progress=False)
    for shots in (0, -3, [2, 0]):
        with pytest.raises(ConfigError, match="shots must be whole numbers of at least 1 image per class"):
            run_grid(settings, "fewshot", "folder", shots=shots, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_only_the_main_process_writes(folder, tmp_path, monkeypatch):
    from vladapt.engine import distributed

    # the CLI's default precision is auto (bf16 on a CPU with native bf16): the library gets the same backbone
    settings = RunSettings(backbone=vladapt.load_clip("vladapt-test-tiny", dtype=storage_dtype("auto")), root=folder,
                           method="zeroshot", progress=False)
    with pytest.raises(ConfigError, match="not both"):
        run_grid(settings, "fewshot", "folder", out=tmp_path, train_config=object(), checkpoint=tmp_path)
    monkeypatch.setattr(distributed, "is_main", lambda: False)  # a helper process of a data-parallel run
    assert run_grid(settings, "fewshot", "folder", shots=1, seeds=2, out=tmp_path / "helper") == []
    assert not (tmp_path / "helper").exists()


def test_summaries_per_protocol():
    rec = {"method": "heba", "protocol": "base2new", "dataset": "eurosat", "shots": 16, "seed": 1,
           "results": {"base": {"accuracy": 80.0}, "new": {"accuracy": 60.0}, "hm": 68.571}}
    assert summary_line(rec) == "heba | base2new | eurosat | 16 shots | seed 1: base 80.00  new 60.00  HM 68.57"
    assert result_summary(rec, 6) == "base  80.00  new  60.00  HM  68.57"
    rec.update(protocol="fewshot", results={"test": {"accuracy": 71.234}})
    assert result_summary(rec) == "accuracy 71.23"
    rec.update(protocol="dg", results={"average": 59.5})
    assert result_summary(rec) == "target average 59.50"


def test_top_level_entry_points(folder):
    assert {"create_method", "list_methods", "load_clip", "load_dataset", "run_grid"} <= set(vladapt.__all__)
    bb = vladapt.load_clip("vladapt-test-tiny")
    zs = vladapt.create_method("zeroshot", bb, ["red circle", "blue square"])
    assert zs.classnames == ["red circle", "blue square"]
    assert vladapt.list_methods()["heba"].trainable and not vladapt.list_methods()["zeroshot"].trainable
    splits = vladapt.load_dataset("folder", folder)
    assert splits.num_classes == 4 and splits.train  # synth folder: its four default classes
    assert vladapt.run_grid is run_grid and vladapt.RunSettings is RunSettings
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        vladapt.nope  # noqa: B018
    # `import vladapt` stays cheap: torch is imported on first use of an entry point
    code = "import sys, vladapt; assert 'torch' not in sys.modules; vladapt.load_clip; assert 'torch' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
