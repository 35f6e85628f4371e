"""``vladapt bench``: methods x datasets x protocols x shots x seeds, resumable, on local worker
processes or a Ray cluster.

Every run is one call of :func:`vladapt.bench.grid.run_grid` for one (method, protocol, dataset,
shots, seed) and writes what ``vladapt train`` writes: the record
``<out>/<protocol>/<method>/<dataset>/shots_<K>-seed_<S>.json`` and the run directory beside it
(``config.json``: the run's method and train config; ``checkpoint/`` and ``log.jsonl`` for trained
methods). Resumability and safety:

* a run whose record exists is skipped (the record is written atomically, last);
* a run with a checkpoint but no record (it was killed half-way) resumes from that checkpoint;
* a run that raises writes ``<run dir>/failed.json`` (error message and traceback), which the next
  successful run of it removes; the other runs go on, and :func:`run_bench` reports the failures;
* each run holds an advisory lock (``fcntl.flock`` on ``.shots_<K>-seed_<S>.lock`` beside the
  record; the kernel drops it when the process dies) while it checks for its record and runs, so
  two grids writing into one results folder never run the same run twice at once.

The grid is described by a :class:`BenchSpec`, built from command-line options or a YAML grid file
(:func:`load_grid_file`, same keys as the options, ``-`` or ``_``; options given on the command line
replace the file's values, and command-line ``KEY=VALUE`` overrides apply after the file's)::

    methods: [heba, coop]
    datasets: [synth_shapes, synth_counts]
    protocols: [base2new, fewshot]
    shots: [1, 4]
    seeds: [1, 2, 3]
    root: DATA                 # relative paths: from the current directory
    out: RESULTS
    config_name: demo          # each method's demo.yaml where vladapt ships one, else the protocol's config
    overrides: [train.epochs=20]          # or a mapping {train.epochs: 20}; every run
    method_overrides:                     # one method's runs only, after `overrides`
      coop: [train.lr=0.01]
    executor: local            # or ray (ray_address: auto / ray://HOST:10001; default a local instance)
    workers: 2                 # local worker processes; threads per run default to cores // workers
    model: vladapt-tiny        # also: pretrained, precision, device, feature_cache, image_cache, targets, threads
"""

from __future__ import annotations

import dataclasses
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from vladapt.errors import ConfigError

PROTOCOLS = ("base2new", "cross_dataset", "dg", "fewshot")
# protocols that evaluate classes the method was not fitted on (closed-set methods cannot run them)
OPEN_PROTOCOLS = ("base2new", "cross_dataset", "dg")
EXECUTORS = ("local", "ray")
FAILED = "failed.json"  # inside the run directory (a name the record readers' shots_*-seed_*.json never match)
RAY_HINT = "the ray executor needs Ray: pip install vladapt[ray]"


@dataclass
class BenchSpec:
    """One benchmark grid (the keys of a grid file and the options of ``vladapt bench``)."""

    methods: list[str]
    datasets: list[str]
    protocols: list[str]
    root: Path
    shots: list[int] = field(default_factory=lambda: [16])
    seeds: list[int] = field(default_factory=lambda: [1])
    out: Path = Path("runs")
    config_name: str | None = None  # e.g. "demo": configs/<method>/<name>.yaml where vladapt ships one
    overrides: list[str] = field(default_factory=list)  # KEY=VALUE for every run
    method_overrides: dict[str, list[str]] = field(default_factory=dict)  # {method: [KEY=VALUE]} applied last
    executor: str = "local"
    workers: int = 1
    threads: int | None = None  # torch threads per run (default: cores // workers)
    ray_address: str | None = None
    model: str = "vladapt-tiny"
    pretrained: str | None = None
    precision: str = "auto"  # auto: chosen per worker machine (vladapt.engine.precision); recorded resolved
    device: str = "cpu"
    feature_cache: str | None = None  # None: $VLADAPT_FEATURE_CACHE or ~/.cache/vladapt/features; "none"
    targets: list[str] | None = None
    image_cache: str | None = None  # decoded test images (vladapt.data.decoded); None or "none": off
    synth_per_class: tuple[int, int, int] = (40, 10, 30)  # images per class of a synthetic dataset written here


GRID_KEYS = {f.name for f in dataclasses.fields(BenchSpec)}


def load_grid_file(path: str | Path) -> dict[str, Any]:
    """The keys of a YAML grid file (checked against :class:`BenchSpec`'s fields)."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read grid file {path} ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"grid file {path} is not valid YAML ({e})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"grid file {path} must be a mapping of keys (methods, datasets, ...)")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - GRID_KEYS)
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in grid file {path}; allowed keys: {sorted(GRID_KEYS)}")
    for key in ("methods", "datasets", "protocols", "shots", "seeds", "targets"):
        if key in data and data[key] is not None and not isinstance(data[key], list):
            data[key] = [data[key]]
    if isinstance(data.get("overrides"), dict):
        data["overrides"] = _mapping_overrides(data["overrides"])
    if "method_overrides" in data:
        mo = data["method_overrides"] or {}
        if not isinstance(mo, dict):
            raise ConfigError(f"method_overrides in grid file {path} must map a method to its overrides")
        data["method_overrides"] = {m: _mapping_overrides(v) if isinstance(v, dict) else list(v or [])
                                    for m, v in mo.items()}
    return data


def _mapping_overrides(mapping: dict[str, Any]) -> list[str]:
    import json

    return [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in mapping.items()]


def make_spec(values: dict[str, Any]) -> BenchSpec:
    """A checked :class:`BenchSpec` from a dict of its keys (missing ones take their defaults)."""
    for key in ("methods", "datasets", "protocols"):
        if not values.get(key):
            raise ConfigError(f"the grid needs {key} (--{key} or '{key}:' in the grid file)")
    if values.get("root") is None:
        raise ConfigError("the grid needs the data root (--root DIR or 'root:' in the grid file)")
    v = {k: x for k, x in values.items() if x is not None}
    # absolute: worker processes and Ray tasks may not start in this directory
    v["root"], v["out"] = Path(v["root"]).expanduser().absolute(), Path(v.get("out", "runs")).expanduser().absolute()
    for key in ("feature_cache", "image_cache"):
        if v.get(key) and str(v[key]).strip().lower() != "none":
            v[key] = str(Path(v[key]).expanduser().absolute())
    for key in ("shots", "seeds"):
        if key in v:
            bad = [x for x in v[key] if not isinstance(x, int) or isinstance(x, bool)]
            if bad:
                raise ConfigError(f"{key} must be whole numbers, got {bad}")
    bad = [k for k in v.get("shots", []) if k < 1]
    if bad:
        raise ConfigError(f"shots must be at least 1 image per class, got {bad}")
    spec = BenchSpec(**v)
    spec.overrides = [str(o) for o in spec.overrides]
    if spec.executor not in EXECUTORS:
        raise ConfigError(f"unknown executor {spec.executor!r}; choose one of {list(EXECUTORS)}")
    if not isinstance(spec.workers, int) or spec.workers < 1:
        raise ConfigError(f"workers must be at least 1, got {spec.workers}")
    if spec.threads is not None and (not isinstance(spec.threads, int) or spec.threads < 1):
        raise ConfigError(f"threads must be at least 1, got {spec.threads}")
    bad = [p for p in spec.protocols if p not in PROTOCOLS]
    if bad:
        raise ConfigError(f"unknown protocol {bad[0]!r}; choose from {list(PROTOCOLS)}")
    from vladapt.engine.precision import PRECISIONS

    if spec.precision not in PRECISIONS:
        raise ConfigError(f"precision {spec.precision!r} is not one of {list(PRECISIONS)}")
    return spec


@dataclass
class Job:
    """One run, as sent to a worker process (picklable)."""

    method: str
    protocol: str
    dataset: str
    shots: int
    seed: int
    method_config: dict[str, Any]
    train_config: Any  # TrainConfig, or None for a training-free method
    out: str
    root: str
    model: str
    pretrained: str | None
    precision: str
    device: str
    feature_cache: str | None
    targets: list[str] | None
    threads: int
    image_cache: str | None = None

    @property
    def key(self) -> tuple:
        return (self.method, self.protocol, self.dataset, self.shots, self.seed)

    @property
    def record(self) -> Path:
        from vladapt.protocols.runner import record_path

        return record_path(Path(self.out), {"protocol": self.protocol, "method": self.method,
                                            "dataset": self.dataset, "shots": self.shots, "seed": self.seed})

    @property
    def run_dir(self) -> Path:
        return self.record.with_suffix("")

    @property
    def label(self) -> str:
        return f"{self.method} {self.protocol} {self.dataset} {self.shots} shots seed {self.seed}"


@dataclass
class BenchResult:
    total: int = 0
    already_done: int = 0
    finished: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    busy: list[dict[str, Any]] = field(default_factory=list)  # running in another grid at the same time
    skipped: list[str] = field(default_factory=list)  # notes on (method, protocol) pairs that cannot run
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed


# ---------------------------------------------------------------- planning (driver)


def run_config(method: str, protocol: str, config_name: str | None, overrides: list[str]):
    """(method config, TrainConfig or None) of one (method, protocol): the packaged config of the
    protocol, or ``configs/<method>/<config_name>.yaml`` where vladapt ships one, then ``overrides``."""
    from vladapt.engine.runconfig import packaged_config, resolve_run_config
    from vladapt.methods import list_methods

    name = config_name if config_name and packaged_config(method, config_name) is not None else protocol
    method_cfg, train_cfg = resolve_run_config(method, name, overrides=overrides)
    return method_cfg, (train_cfg if list_methods()[method].trainable else None)


def plan(spec: BenchSpec) -> tuple[list[Job], list[str]]:
    """Every run of the grid (configs resolved and checked: a bad key fails here, before any compute)
    and the notes on (method, protocol) pairs skipped because the method is closed-set."""
    from vladapt.data import list_datasets
    from vladapt.methods import list_methods
    from vladapt.synth.datasets import description_overrides

    registered = list_methods()
    unknown = [m for m in spec.methods if m not in registered]
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}; available: {sorted(registered)}")
    known = set(list_datasets())
    unknown = [d for d in spec.datasets if d not in known]
    if unknown:
        raise ConfigError(f"unknown dataset(s) {unknown}; available: {sorted(known)}")
    stray = sorted(set(spec.method_overrides) - set(spec.methods))
    if stray:
        raise ConfigError(f"method_overrides names {stray[0]!r}, which is not one of the grid's methods {spec.methods}")
    threads = spec.threads or max(1, _cores() // spec.workers)
    jobs, notes = [], []
    for method in spec.methods:
        cls = registered[method].cls
        for protocol in spec.protocols:
            if protocol in OPEN_PROTOCOLS and not getattr(cls, "unseen_classes", True):
                notes.append(f"{method} skipped on {protocol}: it cannot classify unseen classes (closed-set); "
                             "it runs on fewshot")
                continue
            for dataset in spec.datasets:
                overrides = list(spec.overrides)
                given = any(o.startswith("method.descriptions=") for o in overrides + spec.method_overrides.get(method, []))
                if not given:  # the synthetic datasets ship their class descriptions (as the demo passes them)
                    overrides[:0] = description_overrides(cls.Config, dataset, spec.root)
                overrides += spec.method_overrides.get(method, [])
                method_cfg, train_cfg = run_config(method, protocol, spec.config_name, overrides)
                for shots in spec.shots:
                    for seed in spec.seeds:
                        jobs.append(Job(method, protocol, dataset, shots, seed, method_cfg, train_cfg, str(spec.out),
                                        str(spec.root), spec.model, spec.pretrained, spec.precision, spec.device,
                                        spec.feature_cache, spec.targets, threads, image_cache=spec.image_cache))
    return jobs, notes


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover (not Linux)
        return os.cpu_count() or 1


def run_bench(spec: BenchSpec, echo: Callable[[str], None] = print) -> BenchResult:
    """Run the grid: skip the runs whose record exists, run the others on the executor, print one
    line per finished run; returns the counts, the finished and the failed runs."""
    from vladapt.io import check_writable
    from vladapt.synth.datasets import DATASETS as SYNTH, write_dataset

    t0 = time.perf_counter()
    jobs, notes = plan(spec)
    check_writable(spec.out, "output folder")
    for note in notes:
        echo(f"note: {note}")
    todo = []
    for job in jobs:
        if job.record.is_file():
            (job.run_dir / FAILED).unlink(missing_ok=True)  # a stale failure of a run that succeeded since
        else:
            todo.append(job)
    result = BenchResult(total=len(jobs), already_done=len(jobs) - len(todo), skipped=notes)
    threads = jobs[0].threads if jobs else 1
    where = (f"{spec.workers} local worker process(es) x {threads} torch thread(s)" if spec.executor == "local"
             else f"Ray ({spec.ray_address or 'a local instance'}), {threads} CPU(s) per run")
    echo(f"{result.total} runs: {result.already_done} already done, {len(todo)} to run on {where}")
    for name in sorted({j.dataset for j in todo if j.dataset in SYNTH}):
        if not (spec.root / name).exists():  # never re-render an existing one (it may have other sizes)
            write_dataset(name, spec.root, seed=0, per_class=tuple(spec.synth_per_class), progress=False)
    if todo:
        runner = _run_local if spec.executor == "local" else _run_ray
        for i, (job, res) in enumerate(runner(spec, todo), 1):
            secs = f"({res.get('seconds', 0):.0f} s)"
            if res["status"] == "done":
                result.finished.append(res)
                resumed = f" (resumed from epoch {res['resumed_from_epoch']})" if res.get("resumed_from_epoch") else ""
                echo(f"[{i}/{len(todo)}] {job.label}: {res['summary']}{resumed} {secs}")
            elif res["status"] == "failed":
                result.failed.append(res)
                echo(f"[{i}/{len(todo)}] {job.label}: FAILED: {res['error']} {secs}")
            else:  # another grid holds the run, or finished it meanwhile
                (result.busy if res["status"] == "busy" else result.finished).append(res)
                echo(f"[{i}/{len(todo)}] {job.label}: {res['note']}")
    result.seconds = time.perf_counter() - t0
    echo(summary(result))
    return result


def summary(result: BenchResult) -> str:
    lines = [f"{result.total} runs: {result.already_done} already done, {len(result.finished)} finished now, "
             f"{len(result.failed)} failed, {len(result.busy)} running in another grid "
             f"({result.seconds / 60:.1f} min)"]
    if result.failed:
        lines.append("failed runs (error and traceback in each failed.json):")
        lines += [f"  {r['run']}: {r['error']}  -> {r['failure_file']}" for r in result.failed]
    return "\n".join(lines)


# ---------------------------------------------------------------- one run (worker side)

_BACKBONES: dict[tuple, Any] = {}  # one backbone per (model, weights, device, precision) and worker process
_THREADS: list[int] = []


def _init_worker(threads: int) -> None:
    """Worker process start: ``threads`` torch / OpenMP threads (before torch is imported here)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    _set_threads(threads)
    from vladapt.host_memory import reuse_freed_memory

    reuse_freed_memory()  # a worker process is vladapt's own, as the CLI's is


def _execute_remote(job: Job) -> dict[str, Any]:
    """:func:`execute` in a Ray worker (a process of vladapt's runs: large freed blocks are reused)."""
    from vladapt.host_memory import reuse_freed_memory

    reuse_freed_memory()
    return execute(job)


def _set_threads(threads: int) -> None:
    if _THREADS != [threads]:
        import torch

        torch.set_num_threads(threads)
        _THREADS[:] = [threads]


def _backbone(job: Job):
    from vladapt.engine.precision import storage_dtype

    dtype = storage_dtype(job.precision, job.device, getattr(job.train_config, "precision", None))
    key = (job.model, job.pretrained, job.device, dtype)
    if key not in _BACKBONES:
        from vladapt.backbones import load_clip

        _BACKBONES[key] = load_clip(job.model, job.pretrained, device=job.device, dtype=dtype)
    return _BACKBONES[key]


def execute(job: Job) -> dict[str, Any]:
    """Run one job under its lock; never raises for a failing run (the failure is written to
    ``<run dir>/failed.json`` and returned). Returns ``{"status": done | failed | busy | exists, ...}``."""
    import fcntl

    _set_threads(job.threads)
    t0 = time.perf_counter()
    base = {"run": job.label, "key": list(job.key), "record": str(job.record)}
    job.record.parent.mkdir(parents=True, exist_ok=True)
    with open(job.record.parent / f".{job.record.stem}.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return {**base, "status": "busy", "note": "running in another grid (locked); skipped here"}
        if job.record.is_file():  # another grid finished it after this one looked
            return {**base, "status": "exists", "note": "finished by another grid meanwhile"}
        try:
            record = _run(job)
        except Exception as e:  # noqa: BLE001 - any error of one run is recorded, the grid goes on
            return {**base, **write_failure(job, e, traceback.format_exc(), time.perf_counter() - t0)}
        (job.run_dir / FAILED).unlink(missing_ok=True)
    from vladapt.bench.grid import result_summary

    import torch

    return {**base, "status": "done", "summary": result_summary(record), "seconds": record.get("seconds", 0.0),
            "resumed_from_epoch": record.get("resumed_from_epoch", 0), "pid": os.getpid(),
            "threads": torch.get_num_threads(), "omp_threads": os.environ.get("OMP_NUM_THREADS")}


def write_failure(job: Job, error: BaseException | str, trace: str, seconds: float) -> dict[str, Any]:
    from datetime import datetime, timezone

    from vladapt.io import atomic_write_json

    message = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    failure = {"status": "failed", "error": message.strip().splitlines()[0] if message.strip() else message,
               "message": message, "traceback": trace, "seconds": round(seconds, 3),
               "method": job.method, "protocol": job.protocol, "dataset": job.dataset, "shots": job.shots,
               "seed": job.seed, "failed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "pid": os.getpid()}
    path = atomic_write_json(job.run_dir / FAILED, failure)
    return {**failure, "failure_file": str(path)}


def _run(job: Job) -> dict[str, Any]:
    from vladapt.bench.grid import run_grid
    from vladapt.config import to_dict
    from vladapt.data.decoded import image_cache_option
    from vladapt.engine.feature_cache import FeatureCache, cache_dir_option
    from vladapt.engine.precision import precision_name
    from vladapt.io import atomic_write_json
    from vladapt.protocols.runner import RunSettings

    backbone = _backbone(job)
    cache = cache_dir_option(job.feature_cache)
    settings = RunSettings(backbone=backbone, root=Path(job.root), method=job.method, method_config=job.method_config,
                           device=job.device, progress=False, feature_cache=FeatureCache(cache),
                           image_cache=image_cache_option(job.image_cache))
    atomic_write_json(job.run_dir / "config.json", {
        "method": job.method, "protocol": job.protocol, "dataset": job.dataset, "shots": job.shots, "seed": job.seed,
        "method_config": job.method_config,
        "train_config": to_dict(job.train_config) if job.train_config is not None else None,
        "backbone": {"model": job.model, "pretrained": job.pretrained,
                     "precision": precision_name(backbone.model.dtype)},
        "root": job.root, "targets": job.targets})
    resume = job.train_config is not None and _resumable(job)
    (record,) = run_grid(settings, job.protocol, job.dataset, [job.shots], [job.seed], job.out,
                         train_config=job.train_config, resume=resume, targets=job.targets, report=False)
    return record


def _resumable(job: Job) -> bool:
    """A checkpoint of this very run is in the run directory (same method and train config, seed and
    dataset): the run was killed half-way and continues from it. A checkpoint of another config (a
    failed run rerun with other overrides) is not resumed: the run starts again and replaces it."""
    from vladapt.config import to_dict
    from vladapt.engine.checkpoint import checkpoint_dir, read_meta

    if not (checkpoint_dir(job.run_dir) / "meta.json").is_file():
        return False
    try:
        meta = read_meta(job.run_dir)
    except Exception:  # noqa: BLE001 - a damaged checkpoint: train again from the start
        return False
    return (meta.get("method_config") == job.method_config and meta.get("train_config") == to_dict(job.train_config)
            and meta.get("seed") == job.seed and meta.get("dataset") == job.dataset
            and meta.get("shots", job.shots) == job.shots and meta.get("protocol", job.protocol) == job.protocol)


# ---------------------------------------------------------------- executors (driver side)


def _run_local(spec: BenchSpec, todo: list[Job]) -> Iterator[tuple[Job, dict[str, Any]]]:
    """``spec.workers`` spawned worker processes, one run at a time each. A worker that dies (killed,
    out of memory) breaks the pool: its runs are retried once in a new pool, then recorded as failed."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    threads = todo[0].threads
    attempts: dict[tuple, int] = {}
    pending = list(todo)
    while pending:
        batch, pending = pending, []
        pool = ProcessPoolExecutor(max_workers=min(spec.workers, len(batch)), mp_context=mp.get_context("spawn"),
                                   initializer=_init_worker, initargs=(threads,))
        try:
            futures = {pool.submit(execute, job): job for job in batch}
            for fut in as_completed(futures):
                job = futures[fut]
                try:
                    res = fut.result()
                except BrokenProcessPool:
                    attempts[job.key] = attempts.get(job.key, 0) + 1
                    if attempts[job.key] < 2:
                        pending.append(job)
                        continue
                    res = _driver_failure(job, "the worker process died (killed or out of memory) twice while "
                                               "this run was queued or running")
                yield job, res
        except BaseException:  # Ctrl-C or the caller stopped: stop the workers too, leave no run going
            for proc in list((getattr(pool, "_processes", None) or {}).values()):
                proc.terminate()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()


def _run_ray(spec: BenchSpec, todo: list[Job]) -> Iterator[tuple[Job, dict[str, Any]]]:
    """Each run a Ray task with ``num_cpus`` = threads per run, on the cluster at ``spec.ray_address``
    (default: a new local instance); the driver collects the results as they finish."""
    try:
        import ray
    except ImportError:
        raise ConfigError(RAY_HINT) from None
    started = not ray.is_initialized()
    if started:
        # no address: a new local instance (never a cluster found by chance, e.g. one `ray start` left behind)
        kwargs: dict[str, Any] = {"address": spec.ray_address or "local", "log_to_driver": False}
        if spec.ray_address is None:
            kwargs["include_dashboard"] = False
        ray.init(**kwargs)
    try:
        task = ray.remote(num_cpus=todo[0].threads, max_retries=1)(_execute_remote)
        refs = {task.remote(job): job for job in todo}
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            job = refs.pop(ready[0])
            try:
                res = ray.get(ready[0])
            except Exception as e:  # noqa: BLE001 - a crashed worker, a lost node, vladapt missing on a node
                res = _driver_failure(job, _ray_error(e))
            yield job, res
    finally:
        if started:
            ray.shutdown()


def _ray_error(e: BaseException) -> str:
    """One line for a failed Ray task (its last ``SomeError: ...`` line), with a hint when a node
    cannot import vladapt; the full Ray text follows on the next lines (kept in failed.json)."""
    import re

    text = str(e)
    errors = re.findall(r"^\s*(\w+(?:Error|Exception|Exit)\b.*)$", text, re.M)
    line = errors[-1].strip() if errors else text.strip().splitlines()[0] if text.strip() else type(e).__name__
    if "No module named 'vladapt" in text:
        line += (" (the Ray workers cannot import vladapt: install the same vladapt on every node of the "
                 "cluster, and keep --root and --out on a filesystem every node sees)")
    return f"Ray task failed: {line}\n{type(e).__name__}: {text}"


def _driver_failure(job: Job, message: str) -> dict[str, Any]:
    base = {"run": job.label, "key": list(job.key), "record": str(job.record)}
    return {**base, **write_failure(job, message, "".join(traceback.format_stack(limit=5)), 0.0)}
