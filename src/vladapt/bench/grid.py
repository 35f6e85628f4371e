"""The run grid: one protocol, method and dataset over every (shots, seed), one result record each.

``vladapt train``, ``vladapt eval`` and ``vladapt demo`` all run through :func:`run_grid` (``vladapt eval``
with several checkpoints through :func:`evaluate_checkpoints`), and so can a Python script: it trains
the method (or loads a trained checkpoint), evaluates it through the protocol, writes each record
atomically to ``<out>/<protocol>/<method>/<dataset>/shots_<K>-seed_<S>.json`` (the evaluation of a
trained checkpoint to ``shots_<K>-seed_<S>.eval.json`` beside it, so it never replaces the training
record) and the Markdown report of every record under ``out`` to ``<out>/report.md``, rewritten after
every record (a later failing run leaves the report of the finished ones). In a data-parallel run
(``torchrun``) every process trains; only rank 0 evaluates and writes.

A training record holds the full ``train_config`` (an evaluation record the one of its checkpoint)
and, for a resumed run (``resume=True``), ``resumed_from_epoch``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from vladapt.errors import ConfigError

if TYPE_CHECKING:
    from vladapt.engine.train import TrainConfig
    from vladapt.protocols.runner import RunSettings, TrainFn

TRANSFER_PROTOCOLS = ("cross_dataset", "dg")


def run_grid(settings: RunSettings, protocol: str, dataset: str, shots: int | Sequence[int] = (16,),
             seeds: int | Sequence[int] = (1,), out: str | Path = "runs", *, train_config: TrainConfig | None = None,
             resume: bool = False, checkpoint: str | Path | None = None, targets: Sequence[str] | None = None,
             report: bool = True,
             on_record: Callable[[dict[str, Any], Path], None] | None = None) -> list[dict[str, Any]]:
    """Run ``protocol`` for every shots (outer loop) and seed (each a number or a list); returns the
    records (none on ranks > 0).

    How the method gets its weights: with ``train_config`` every run trains with
    :func:`~vladapt.engine.train.fit` in its run directory (the record path without ``.json``, which
    the record names as ``run_dir``; ``resume`` continues from the checkpoint found there); with
    ``checkpoint`` (the run directory of a trained run) every run loads those weights and the record
    names it; otherwise ``settings.train_fn`` is used as given (``None`` suits training-free methods).
    ``targets`` replaces the target datasets of cross_dataset and dg. ``on_record(record, path)`` is
    called after each record is written; ``report=False`` skips ``report.md``. ``out`` must be
    writable: that is checked before any run starts.
    """
    from vladapt.bench.report import load_records, markdown_report
    from vladapt.config import to_dict
    from vladapt.engine import distributed as dist
    from vladapt.io import atomic_write_json, atomic_write_text, check_writable
    from vladapt.protocols.runner import record_path, run_protocol

    if train_config is not None and checkpoint is not None:
        raise ConfigError("run_grid trains (train_config) or loads a checkpoint, not both")
    shots, seeds = ([x] if isinstance(x, int) else list(x) for x in (shots, seeds))
    bad = [k for k in shots if not isinstance(k, int) or isinstance(k, bool) or k < 1]
    if bad:
        raise ConfigError(f"shots must be whole numbers of at least 1 image per class, got {bad}")
    out, main = Path(out), dist.is_main()
    if main:  # a read-only or impossible --out fails now, not after the first run's compute
        check_writable(out, "output folder")
    settings = replace(settings, out_dir=out, evaluate=settings.evaluate and main)
    checkpoint_train_config = None
    if checkpoint is not None:
        settings.train_fn = _checkpoint_loader(Path(checkpoint), settings.backbone.fingerprint)
        checkpoint_train_config = settings.train_fn.meta.get("train_config")
    extra = {"targets": tuple(targets)} if targets and protocol in TRANSFER_PROTOCOLS else {}
    records = []

    def write_report() -> None:
        if report and main:
            atomic_write_text(out / "report.md", markdown_report(load_records(out)))

    for k in shots:
        if train_config is not None:
            settings.train_fn = _trainer(train_config, protocol, k, resume, settings.progress, settings.device)
        for seed in seeds:
            run_dir = None
            if train_config is not None:
                run_dir = record_path(out, {"protocol": protocol, "method": settings.method, "dataset": dataset,
                                            "shots": k, "seed": seed}).with_suffix("")
                settings.train_fn.resumed_from_epoch = 0
            record = run_protocol(protocol, settings, dataset, k, seed, run_dir=run_dir, **extra)
            if record is None or not main:  # a helper process of a data-parallel run
                continue
            if run_dir is not None:
                record["run_dir"] = str(run_dir)
                record["train_config"] = to_dict(train_config)
                if settings.train_fn.resumed_from_epoch:
                    record["resumed_from_epoch"] = settings.train_fn.resumed_from_epoch
            if checkpoint is not None:
                record["checkpoint"] = str(checkpoint)
                if checkpoint_train_config is not None:
                    record["train_config"] = checkpoint_train_config
            path = atomic_write_json(record_path(out, record), record)
            records.append(record)
            write_report()  # after every record: a later failure leaves the report of the finished runs
            if on_record is not None:
                on_record(record, path)
    write_report()
    return records


def evaluate_checkpoints(settings: Sequence[RunSettings], checkpoints: Sequence[str | Path], protocol: str,
                         dataset: str, shots: int | Sequence[int] = (16,), seeds: int | Sequence[int] = (1,),
                         out: str | Path = "runs", *, targets: Sequence[str] | None = None, report: bool = True,
                         on_record: Callable[[dict[str, Any], Path], None] | None = None) -> list[dict[str, Any]]:
    """:func:`run_grid` with ``checkpoint=`` for several checkpoints on one test set, evaluated together:
    per (shots, seed) every checkpoint is loaded into its method (``settings[i]`` names checkpoint i's
    method and config, all on one backbone) and each test image is read once for all of them, with
    the frozen image-tower blocks they share computed once
    (:func:`~vladapt.protocols.runner.run_protocol_many`). Each checkpoint gets its own record,
    as :func:`run_grid` writes it. Two checkpoints that would write the same record (same method,
    protocol, dataset, shots and seed) are an error. Single process only."""
    from vladapt.bench.report import load_records, markdown_report
    from vladapt.io import atomic_write_json, atomic_write_text, check_writable
    from vladapt.protocols.runner import record_path, run_protocol_many

    if len(settings) != len(checkpoints) or not checkpoints:
        raise ConfigError("evaluate_checkpoints needs one RunSettings per checkpoint")
    if len({id(s.backbone) for s in settings}) != 1:
        raise ConfigError("evaluate_checkpoints evaluates checkpoints on one backbone: give every RunSettings "
                          "the same loaded backbone")
    shots, seeds = ([x] if isinstance(x, int) else list(x) for x in (shots, seeds))
    bad = [k for k in shots if not isinstance(k, int) or isinstance(k, bool) or k < 1]
    if bad:
        raise ConfigError(f"shots must be whole numbers of at least 1 image per class, got {bad}")
    out = Path(out)
    check_writable(out, "output folder")
    for k in shots:
        for seed in seeds:
            seen: dict[Path, Path] = {}
            for s, ckpt in zip(settings, checkpoints):
                path = record_path(out, {"protocol": protocol, "method": s.method, "dataset": dataset, "shots": k,
                                         "seed": seed, "checkpoint": str(ckpt)})
                if path in seen:
                    raise ConfigError(f"checkpoints {seen[path]} and {ckpt} would both write {path} (same method, "
                                      "protocol, dataset, shots and seed): evaluate them with different --out folders")
                seen[path] = Path(ckpt)
    loaders = [_checkpoint_loader(Path(c), settings[0].backbone.fingerprint) for c in checkpoints]
    settings = [replace(s, out_dir=out, evaluate=True, train_fn=load) for s, load in zip(settings, loaders)]
    extra = {"targets": tuple(targets)} if targets and protocol in TRANSFER_PROTOCOLS else {}
    records = []

    def write_report() -> None:
        if report:
            atomic_write_text(out / "report.md", markdown_report(load_records(out)))

    for k in shots:
        for seed in seeds:
            group = run_protocol_many(protocol, settings, dataset, k, seed, **extra)
            for record, ckpt, load in zip(group, checkpoints, loaders):
                record["checkpoint"] = str(ckpt)
                if load.meta.get("train_config") is not None:
                    record["train_config"] = load.meta["train_config"]
                path = atomic_write_json(record_path(out, record), record)
                records.append(record)
                if on_record is not None:
                    on_record(record, path)
            write_report()
    write_report()
    return records


def _trainer(cfg: TrainConfig, protocol: str, shots: int, resume: bool, progress: bool, device: str) -> TrainFn:
    from vladapt.engine.train import fit

    def train(method, splits, seed: int, run_dir: Path | None) -> None:
        # protocol and shots go into the checkpoint's meta: `vladapt eval --checkpoint` reruns from them
        fit(method, splits, cfg, seed, run_dir=run_dir, resume=resume, progress=progress, device=device,
            extra_meta={"protocol": protocol, "shots": shots})
        train.resumed_from_epoch = getattr(method, "resumed_from_epoch", 0)

    train.resumed_from_epoch = 0
    return train


def _checkpoint_loader(checkpoint: Path, fingerprint: str) -> TrainFn:
    from vladapt.engine.checkpoint import load_checkpoint, read_meta

    meta = read_meta(checkpoint)
    classnames = meta["classnames"]

    def load(method, splits, seed: int, run_dir: Path | None) -> None:
        # the weights are tied to the class list they were trained on (text features, negatives)
        if list(splits.classnames) != classnames:
            raise ConfigError(f"checkpoint {checkpoint} was trained on classes {classnames[:5]}..., "
                              f"but this run trains on {list(splits.classnames)[:5]}...: use the checkpoint's "
                              "dataset, protocol, shots and seed")
        load_checkpoint(checkpoint, method, fingerprint)

    load.meta = meta
    return load


def result_summary(record: dict[str, Any], width: int = 0) -> str:
    """The record's headline numbers, per protocol: ``base 80.00  new 60.00  HM 68.57`` (base2new),
    ``accuracy 80.00`` (fewshot), ``target average 60.00`` (cross_dataset, dg); ``width`` pads each."""
    res = record["results"]
    if record["protocol"] == "base2new":
        return (f"base {res['base']['accuracy']:{width}.2f}  new {res['new']['accuracy']:{width}.2f}  "
                f"HM {res['hm']:{width}.2f}")
    if record["protocol"] == "fewshot":
        return f"accuracy {res['test']['accuracy']:{width}.2f}"
    return f"target average {res['average']:{width}.2f}"


def summary_line(record: dict[str, Any]) -> str:
    """``heba | base2new | eurosat | 16 shots | seed 1: base 80.00  new 60.00  HM 68.57``, followed by
    ``(resumed from epoch N)`` for a resumed run."""
    resumed = f" (resumed from epoch {record['resumed_from_epoch']})" if record.get("resumed_from_epoch") else ""
    return (f"{record['method']} | {record['protocol']} | {record['dataset']} | {record['shots']} shots | "
            f"seed {record['seed']}: {result_summary(record)}{resumed}")
