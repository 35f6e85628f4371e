"""``vladapt bench``: the resumable grid, its executors, failures, and two grids sharing a results folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vladapt.bench.bench import FAILED, make_spec, run_bench
from vladapt.cli import main
from vladapt.errors import ConfigError

SRC = str(Path(__file__).resolve().parent.parent / "src")
FAST = ["train.epochs=1", "train.warmup_epochs=0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two synthetic datasets at a tiny size (written once for the module)."""
    from vladapt.synth.datasets import write_dataset

    root = tmp_path_factory.mktemp("bench") / "data"
    for name in ("synth_shapes", "synth_counts"):
        write_dataset(name, root, seed=0, per_class=(4, 2, 4))
    return root


def spec(data, out, **kw):
    values = {"methods": ["zeroshot", "coop"], "datasets": ["synth_shapes", "synth_counts"], "protocols": ["fewshot"],
              "shots": [1], "seeds": [1, 2], "root": data, "out": out, "model": "vladapt-test-tiny",
              "overrides": list(FAST)}
    values.update(kw)
    return make_spec(values)


def records(out: Path) -> dict[str, Path]:
    return {str(p.relative_to(out)): p for p in sorted(out.rglob("shots_*-seed_*.json"))}


def snapshot(out: Path) -> dict[str, tuple[int, str]]:
    return {k: (p.stat().st_mtime_ns, p.read_text()) for k, p in records(out).items()}


def cli(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "vladapt.cli", "bench", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)


EXPECTED = {f"fewshot/{m}/{d}/shots_1-seed_{s}.json" for m in ("zeroshot", "coop")
            for d in ("synth_shapes", "synth_counts") for s in (1, 2)}


@pytest.mark.parametrize("workers", [1, 2])
def test_local_grid_writes_every_run_and_a_rerun_skips_them(data, tmp_path, workers, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the workers set their own thread count, whatever they inherit
    out, lines = tmp_path / "out", []
    result = run_bench(spec(data, out, workers=workers), echo=lines.append)
    assert result.ok and result.total == 8 and len(result.finished) == 8
    assert lines[0] == "8 runs: 0 already done, 8 to run on " \
        f"{workers} local worker process(es) x {max(1, len(os.sched_getaffinity(0)) // workers)} torch thread(s)"
    progress = [ln for ln in lines if ln.startswith("[")]
    assert [ln.split("]")[0] for ln in progress] == [f"[{i}/8" for i in range(1, 9)]
    assert all(" fewshot " in ln and "accuracy" in ln and ln.endswith(" s)") for ln in progress)
    assert set(records(out)) == EXPECTED
    for rel, path in records(out).items():
        rec = json.loads(path.read_text())
        assert (rec["method"], rec["dataset"], rec["shots"]) == tuple(rel.split("/")[1:3]) + (1,)
        run_dir = path.with_suffix("")
        assert json.loads((run_dir / "config.json").read_text())["seed"] == rec["seed"]
        if rec["method"] == "coop":  # trained: checkpoint and log in its run directory
            assert (run_dir / "checkpoint" / "meta.json").is_file() and (run_dir / "log.jsonl").is_file()
    # workers x threads = cores, in the workers (torch and OpenMP)
    cores = len(os.sched_getaffinity(0))
    assert {r["threads"] for r in result.finished} == {max(1, cores // workers)}
    assert {r["omp_threads"] for r in result.finished} == {str(max(1, cores // workers))}
    # the pool's processes are reused across runs: never more processes than workers
    assert len(result.finished) == 8 and len({r["pid"] for r in result.finished}) <= workers
    assert os.getpid() not in {r["pid"] for r in result.finished}  # runs execute in worker processes
    assert not list(out.rglob(FAILED)) and not list(out.rglob("*.tmp"))
    before, lines = snapshot(out), []
    again = run_bench(spec(data, out, workers=workers), echo=lines.append)
    assert again.already_done == 8 and not again.finished and "8 runs: 8 already done, 0 to run" in lines[0]
    assert snapshot(out) == before  # nothing rewritten


def test_grid_file_closed_set_methods_and_bad_keys(data, tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"methods: [linear_probe]\ndatasets: [synth_shapes]\nprotocols: [base2new]\nroot: {data}\n"
                    f"out: {tmp_path / 'out'}\nmodel: vladapt-test-tiny\noverrides: {{train.epochs: 1}}\n")
    assert main(["bench", "--grid", str(grid)]) == 0
    printed = capsys.readouterr().out
    assert "note: linear_probe skipped on base2new: it cannot classify unseen classes" in printed
    assert "0 runs: 0 already done, 0 to run" in printed
    grid.write_text(grid.read_text() + "epochs: 3\n")
    assert main(["bench", "--grid", str(grid)]) == 2
    assert "unknown key 'epochs' in grid file" in capsys.readouterr().err
    # a bad config key stops the grid before any run, naming the key
    assert main(["bench", "--methods", "coop", "--datasets", "synth_shapes", "--protocols", "fewshot", "--root",
                 str(data), "--out", str(tmp_path / "o2"), "train.nope=1"]) == 2
    assert "train.nope" in capsys.readouterr().err and not records(tmp_path / "o2")


def test_missing_ray_gives_the_install_hint(data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ConfigError, match=r"pip install vladapt\[ray\]"):
        run_bench(spec(data, tmp_path / "out", methods=["zeroshot"], seeds=[1], executor="ray"), echo=lambda s: None)


def test_a_failing_run_is_recorded_and_the_grid_goes_on(data, tmp_path, capsys):
    out, grid = tmp_path / "out", tmp_path / "grid.yaml"
    # coop on synth_counts only would be nicer; the override is per method: lr 1e30 diverges in epoch 2
    grid.write_text(f"methods: [zeroshot, coop]\ndatasets: [synth_shapes]\nprotocols: [fewshot]\nshots: [1]\n"
                    f"seeds: [1, 2]\nroot: {data}\nout: {out}\nmodel: vladapt-test-tiny\n"
                    "overrides: [train.warmup_epochs=0]\n"
                    "method_overrides: {coop: [train.lr=1e30, train.epochs=2]}\n")
    assert main(["bench", "--grid", str(grid)]) == 1  # non-zero: a run failed
    printed = capsys.readouterr().out
    assert set(records(out)) == {f"fewshot/zeroshot/synth_shapes/shots_1-seed_{s}.json" for s in (1, 2)}
    failures = sorted(out.rglob(FAILED))
    assert [p.parent.name for p in failures] == ["shots_1-seed_1", "shots_1-seed_2"]
    for p in failures:
        failure = json.loads(p.read_text())
        assert failure["method"] == "coop" and "DivergedError" in failure["error"]
        assert "Traceback" in failure["traceback"] and "fit" in failure["traceback"]
        assert f"coop fewshot synth_shapes 1 shots seed {failure['seed']}: DivergedError" in printed
        assert f"-> {p}" in printed  # the summary lists it with its failure file
    assert "2 failed" in printed and "FAILED: DivergedError" in printed
    # fixed: the rerun runs only the failed runs (from the start: the kept checkpoint is of another config)
    # and removes their failure files
    zs = snapshot(out)
    grid.write_text(grid.read_text().replace("train.lr=1e30", "train.lr=0.002"))
    assert main(["bench", "--grid", str(grid)]) == 0
    printed = capsys.readouterr().out
    assert "4 runs: 2 already done, 2 to run" in printed and "0 failed" in printed
    assert not list(out.rglob(FAILED)) and len(records(out)) == 4
    assert {k: v for k, v in snapshot(out).items() if k in zs} == zs


@pytest.mark.slow  # subprocesses / a Ray instance: 25-65 s on a shared 2-core machine
def test_a_killed_grid_resumes_without_lost_or_duplicated_records(data, tmp_path):
    out = tmp_path / "out"
    args = ["--methods", "coop", "--datasets", "synth_shapes", "--protocols", "fewshot", "--shots", "1", "--seeds",
            "1", "2", "--root", str(data), "--out", str(out), "--model", "vladapt-test-tiny", "--workers", "1",
            "train.epochs=8", "train.warmup_epochs=0"]
    proc = cli(*args)
    run = out / "fewshot/coop/synth_shapes"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:  # kill it while a later run is half-way (checkpoint, no record)
            done = records(out)
            half = [d for d in run.glob("shots_1-seed_*") if d.is_dir() and (d / "checkpoint/meta.json").is_file()
                    and not d.with_suffix(".json").exists()]
            if done and half:
                break
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.02)
        else:
            pytest.fail("the grid never reached a half-finished run")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = snapshot(out)
    killed = half[0].name
    assert before and f"fewshot/coop/synth_shapes/{killed}.json" not in before
    rerun = cli(*args)
    printed = rerun.communicate(timeout=180)[0]
    assert rerun.returncode == 0, printed
    assert f"2 runs: {len(before)} already done, {2 - len(before)} to run" in printed
    after = snapshot(out)
    assert set(after) == {f"fewshot/coop/synth_shapes/shots_1-seed_{s}.json" for s in (1, 2)}
    assert {k: v for k, v in after.items() if k in before} == before  # finished records untouched
    resumed = json.loads((run / f"{killed}.json").read_text())
    assert resumed.get("resumed_from_epoch", 0) >= 1, printed  # continued from its checkpoint
    assert "resumed from epoch" in printed
    assert not list(out.rglob(FAILED))  # (the kill may leave the temporary file of an unfinished write)


@pytest.mark.slow  # subprocesses / a Ray instance: 25-65 s on a shared 2-core machine
def test_two_grids_at_once_into_one_results_folder(data, tmp_path):
    out = tmp_path / "out"
    args = ["--methods", "zeroshot", "coop", "--datasets", "synth_shapes", "synth_counts", "--protocols", "fewshot",
            "--shots", "1", "--seeds", "1", "2", "--root", str(data), "--out", str(out), "--model",
            "vladapt-test-tiny", "--workers", "1", "--threads", "1", *FAST]
    procs = [cli(*args), cli(*args)]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert set(records(out)) == EXPECTED
    for path in records(out).values():
        json.loads(path.read_text())  # valid JSON
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(FAILED))
    # every run was executed by exactly one of the two grids (the other skipped it: done or locked)
    ran = [ln for o in outputs for ln in o.splitlines() if ln.startswith("[") and "accuracy" in ln]
    assert len(ran) == 8, outputs


@pytest.mark.slow  # subprocesses / a Ray instance: 25-65 s on a shared 2-core machine
def test_ray_executor_runs_the_grid(data, tmp_path):
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install vladapt[ray])")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        out, lines = tmp_path / "out", []
        result = run_bench(spec(data, out, executor="ray", threads=1), echo=lines.append)
    finally:
        ray.shutdown()
    assert result.ok and len(result.finished) == 8, lines
    assert set(records(out)) == EXPECTED
    assert "Ray (a local instance), 1 CPU(s) per run" in lines[0]
    assert len([ln for ln in lines if ln.startswith("[")]) == 8


def _worker_pids() -> list[int]:
    """The pool worker processes of this process (spawned children running spawn_main)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmd = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == os.getpid() and b"spawn_main" in cmd:
            pids.append(int(stat.parent.name))
    return pids


@pytest.mark.slow  # a worker process is killed mid-run: about 25 s
@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs /proc to find the worker processes")
def test_a_killed_worker_process_is_replaced_and_its_run_resumes(data, tmp_path):
    import threading

    out = tmp_path / "out"
    run = out / "fewshot/coop/synth_shapes"
    killed = []

    def kill_worker_mid_run():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            half = [d for d in run.glob("shots_1-seed_*") if (d / "checkpoint/meta.json").is_file()
                    and not d.with_suffix(".json").exists()]
            pids = _worker_pids()
            if half and pids:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(half[0].name)
                return
            time.sleep(0.02)

    thread = threading.Thread(target=kill_worker_mid_run)
    thread.start()
    lines = []
    result = run_bench(spec(data, out, methods=["coop"], datasets=["synth_shapes"], workers=1,
                            overrides=["train.epochs=8", "train.warmup_epochs=0"]), echo=lines.append)
    thread.join()
    assert killed, "no worker was killed"
    assert result.ok and len(result.finished) == 2, lines  # the run of the killed worker ran again
    assert set(records(out)) == {f"fewshot/coop/synth_shapes/shots_1-seed_{s}.json" for s in (1, 2)}
    assert json.loads((run / f"{killed[0]}.json").read_text()).get("resumed_from_epoch", 0) >= 1
    assert not list(out.rglob(FAILED))
