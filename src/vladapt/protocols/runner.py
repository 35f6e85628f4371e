"""The four protocols of the field as objects that run a method and produce result records.

* ``base2new``: few-shot sample, split classes into base (first ceil(n/2) sorted labels) and new,
  train on base, evaluate the base test set and the new test set (closed-set per half), HM.
* ``cross_dataset``: train on the source (ImageNet, all classes), evaluate the source test set and
  the full test sets of the targets; the average is over the targets only.
* ``dg`` (domain generalization): the same with ImageNet-V2/-Sketch/-A/-R as targets.
* ``fewshot``: train on all classes with K shots, evaluate the test set.

A record is a JSON-ready dict; one record per (method, protocol, dataset, shots, seed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, TensorDataset

from vladapt import __version__
from vladapt.backbones import Backbone
from vladapt.data import DatasetSplits, fewshot_splits, load_dataset, require_images, subsample_classes
from vladapt.engine.precision import precision_name
from vladapt.errors import ConfigError
from vladapt.protocols.metrics import CROSS_DATASET_TARGETS, DG_TARGETS, average, harmonic_mean

# train_fn(method, train_splits, seed, run_dir) trains the method in place.
TrainFn = Callable[[Any, DatasetSplits, int, Path | None], None]


@dataclass
class RunSettings:
    """Everything a protocol needs besides the method and the data."""

    backbone: Backbone
    root: Path
    method: str
    method_config: dict[str, Any] = field(default_factory=dict)
    train_fn: TrainFn | None = None
    device: str = "cpu"
    batch_size: int = 64
    workers: int = 0
    progress: bool = True
    out_dir: Path | None = None
    evaluate: bool = True  # False in the helper processes of a data-parallel run: only rank 0 evaluates
    # Frozen image features of feature-level methods (None: kept in memory for one run only)
    feature_cache: Any = None
    # Decoded, resized and cropped test images of image-level methods (None: decode at every evaluation)
    image_cache: Path | None = None


def build_method(settings: RunSettings, classnames: list[str], dataset: str):
    from vladapt.methods import create_method

    method = create_method(settings.method, settings.backbone, classnames, settings.method_config)
    method.set_classnames(classnames, dataset=dataset, split="train")
    method.progress = settings.progress
    return method.to(settings.device)


def _test_loader(settings: RunSettings, splits: DatasetSplits, desc: str = "eval"):
    """Batches ``(images, labels)`` of ``splits.test`` through the backbone's test transform: from the
    decoded-image cache when ``settings.image_cache`` is set (and can serve the transform), else decoded."""
    from vladapt.data import ImageDataset

    if settings.image_cache is not None:
        from vladapt.data.decoded import evaluation_loader

        loader = evaluation_loader(splits.test, splits.image_root, settings.backbone.test_transform,
                                   settings.image_cache, settings.batch_size, device=settings.device,
                                   workers=settings.workers, progress=settings.progress, desc=desc)
        if loader is not None:
            return loader
    return DataLoader(ImageDataset(splits.test, splits.image_root, settings.backbone.test_transform),
                      batch_size=settings.batch_size, shuffle=False, num_workers=settings.workers,
                      pin_memory=str(settings.device).startswith("cuda"))


def _item(res, splits: DatasetSplits, method) -> dict[str, Any]:
    return {"accuracy": res.accuracy, "correct": res.correct, "total": res.total, "macro_f1": res.macro_f1,
            "num_classes": splits.num_classes, **method.evaluation_info()}


def evaluate_items(settings: RunSettings, method, splits: DatasetSplits, dataset: str, desc: str,
                   split: str = "all") -> dict[str, Any]:
    """Evaluate ``method`` on ``splits.test`` over ``splits.classnames`` (``split``: base, new or all)."""
    from vladapt.engine import evaluate

    method.set_classnames(splits.classnames, dataset=dataset, split=split)
    method.eval()
    source = getattr(method, "feature_source", None)
    if getattr(method, "feature_level", False) and source is not None:
        # feature-level methods classify the frozen test features (encoded once, then cached)
        labels = torch.tensor([d.label for d in splits.test], dtype=torch.long)
        loader = DataLoader(TensorDataset(source.test_features(splits), labels), batch_size=settings.batch_size)
        predict = method.feature_logits
    else:
        loader = _test_loader(settings, splits, desc)
        predict = method
    res = evaluate(predict, loader, splits.num_classes, device=settings.device, progress=settings.progress, desc=desc)
    return _item(res, splits, method)


def evaluate_items_many(settings: list[RunSettings], methods: list, splits: DatasetSplits, dataset: str, desc: str,
                        split: str = "all") -> list[dict[str, Any]]:
    """:func:`evaluate_items` of several methods on one backbone (``settings[i]`` that of
    ``methods[i]``): the methods that classify images run in one pass over the test images with
    the frozen image-tower blocks in front of each one's first adapted block computed once per image
    (:func:`~vladapt.engine.evaluate.evaluate_many`); feature-level methods classify their cached
    features as in :func:`evaluate_items`. The results equal :func:`evaluate_items` per method."""
    from vladapt.engine import evaluate_many

    backbones = {id(s.backbone) for s in settings}
    if len(backbones) != 1 or len(settings) != len(methods):
        raise ConfigError("evaluate_items_many needs one RunSettings per method, all with the same backbone")
    results: list[dict[str, Any] | None] = [None] * len(methods)
    on_images: dict[str, Any] = {}
    for i, (s, method) in enumerate(zip(settings, methods)):
        if getattr(method, "feature_level", False) and getattr(method, "feature_source", None) is not None:
            results[i] = evaluate_items(s, method, splits, dataset, f"{desc} [{s.method}]", split)
        else:
            method.set_classnames(splits.classnames, dataset=dataset, split=split)
            method.eval()
            on_images[str(i)] = method
    if on_images:
        first = settings[int(next(iter(on_images)))]
        many = evaluate_many(on_images, _test_loader(first, splits, desc), splits.num_classes, device=first.device,
                             progress=first.progress, desc=desc)
        for key, res in many.items():
            results[int(key)] = _item(res, splits, on_images[key])
    return results  # type: ignore[return-value]


def _require_unseen_classes(settings: RunSettings, protocol: str) -> None:
    """Fail before any work when the method cannot classify classes it was not fitted on (a cache of
    labelled images: Tip-Adapter) and ``protocol`` evaluates such classes."""
    from vladapt.methods import list_methods

    info = list_methods().get(settings.method)
    if info is not None and not getattr(info.cls, "unseen_classes", True):
        raise ConfigError(f"method {settings.method!r} cannot classify unseen classes (it holds weights or a cache "
                          f"for its training classes only), and the {protocol} protocol evaluates classes it was not fitted on; "
                          "use the fewshot protocol (--protocol fewshot)")


def _train(settings: RunSettings, method, train: DatasetSplits, seed: int, run_dir: Path | None) -> bool:
    if not getattr(method, "trainable", False):
        return False
    if settings.train_fn is None:
        raise ConfigError(f"method {settings.method!r} needs training but no trainer was given")
    settings.train_fn(method, train, seed, run_dir)
    return True


def _prepare(settings: RunSettings, dataset: str, shots: int, seed: int, run_dir: Path | None,
             train_classes: str = "all"):
    """Few-shot sample ``dataset``, build the method on ``train_classes``, let it prepare (fit
    training-free parts on the training splits and their frozen features) and train it (if trainable).

    Returns (few-shot splits of all classes, the method, whether it was trained)."""
    torch.manual_seed(seed)
    full = load_dataset(dataset, settings.root)
    few = fewshot_splits(full, shots, seed, cache_dir=full.fewshot_cache_dir)
    require_images(few, ("train", "val", "test") if settings.evaluate else ("train", "val"), dataset=dataset,
                   root=settings.root)  # every image this run reads, before any compute
    train = subsample_classes(few, train_classes)
    method = build_method(settings, train.classnames, dataset)
    from vladapt.engine.features import FrozenFeatures

    features = FrozenFeatures(settings.backbone, train, settings.device, settings.batch_size, seed,
                              settings.progress, settings.workers, cache=settings.feature_cache)
    method.prepare(train, features)
    method.feature_source = features  # the engine and the evaluation read a feature-level method's features here
    return few, method, _train(settings, method, train, seed, run_dir)


def _record(settings: RunSettings, protocol: str, dataset: str, shots: int, seed: int, method,
            trained: bool, results: dict[str, Any], t0: float) -> dict[str, Any]:
    bb = settings.backbone
    describe = method.describe() if hasattr(method, "describe") else {}
    return {
        "method": settings.method,
        "protocol": protocol,
        "dataset": dataset,
        "shots": shots,
        "seed": seed,
        "trained": trained,
        "backbone": {"name": bb.name, "pretrained": bb.pretrained, "fingerprint": bb.fingerprint},
        # the backbone's storage precision (evaluation runs in it) and the autocast precision of training
        "precision": {"backbone": precision_name(bb.model.dtype),
                      "train": getattr(method, "train_precision", None) if trained else None},
        "method_config": describe.get("config", settings.method_config),
        "trainable_parameters": describe.get("trainable_parameters", 0),
        "results": results,
        "seconds": round(time.perf_counter() - t0, 3),
        "vladapt_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# An evaluation over N methods: (splits, dataset, desc, split) -> one result item per method.
EvalFn = Callable[..., list[dict[str, Any]]]


def _base2new_results(ev: EvalFn, few: DatasetSplits, dataset: str) -> list[dict[str, Any]]:
    base, new = subsample_classes(few, "base"), subsample_classes(few, "new")
    res_base = ev(base, dataset, f"{dataset} base", "base")
    res_new = ev(new, dataset, f"{dataset} new", "new")
    return [{"base": b, "new": n, "hm": harmonic_mean(b["accuracy"], n["accuracy"])} for b, n in zip(res_base, res_new)]


def _transfer_results(ev: EvalFn, few: DatasetSplits, source: str, targets: tuple[str, ...],
                      root: Path) -> list[dict[str, Any]]:
    res_source = ev(few, source, source)
    per_target = {target: ev(load_dataset(target, root), target, target) for target in targets}
    return [{"source": {source: res_source[i]}, "targets": {t: r[i] for t, r in per_target.items()},
             "average": average(r[i]["accuracy"] for r in per_target.values())} for i in range(len(res_source))]


def _fewshot_results(ev: EvalFn, few: DatasetSplits, dataset: str) -> list[dict[str, Any]]:
    return [{"test": r} for r in ev(few, dataset, dataset)]


def _one(settings: RunSettings, method) -> EvalFn:
    return lambda splits, dataset, desc, split="all": [evaluate_items(settings, method, splits, dataset, desc, split)]


def _require_target_images(settings: RunSettings, targets: tuple[str, ...]) -> None:
    for target in targets if settings.evaluate else ():  # the targets' test images too, before training on the source
        require_images(load_dataset(target, settings.root), ("test",), dataset=target, root=settings.root)


def run_base2new(settings: RunSettings, dataset: str, shots: int, seed: int,
                 run_dir: Path | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    _require_unseen_classes(settings, "base2new")
    few, method, trained = _prepare(settings, dataset, shots, seed, run_dir, train_classes="base")
    if not settings.evaluate:
        return None
    results = _base2new_results(_one(settings, method), few, dataset)[0]
    return _record(settings, "base2new", dataset, shots, seed, method, trained, results, t0)


def _run_transfer(settings: RunSettings, protocol: str, source: str, targets: tuple[str, ...], shots: int,
                  seed: int, run_dir: Path | None) -> dict[str, Any]:
    t0 = time.perf_counter()
    _require_target_images(settings, targets)
    few, method, trained = _prepare(settings, source, shots, seed, run_dir)
    if not settings.evaluate:
        return None
    results = _transfer_results(_one(settings, method), few, source, targets, settings.root)[0]
    return _record(settings, protocol, source, shots, seed, method, trained, results, t0)


def run_cross_dataset(settings: RunSettings, dataset: str = "imagenet", shots: int = 16, seed: int = 1,
                      run_dir: Path | None = None, targets: tuple[str, ...] = CROSS_DATASET_TARGETS) -> dict[str, Any]:
    _require_unseen_classes(settings, "cross_dataset")
    return _run_transfer(settings, "cross_dataset", dataset, targets, shots, seed, run_dir)


def run_domain_generalization(settings: RunSettings, dataset: str = "imagenet", shots: int = 16, seed: int = 1,
                              run_dir: Path | None = None, targets: tuple[str, ...] = DG_TARGETS) -> dict[str, Any]:
    return _run_transfer(settings, "dg", dataset, targets, shots, seed, run_dir)


def run_fewshot(settings: RunSettings, dataset: str, shots: int, seed: int,
                run_dir: Path | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    few, method, trained = _prepare(settings, dataset, shots, seed, run_dir)
    if not settings.evaluate:
        return None
    results = _fewshot_results(_one(settings, method), few, dataset)[0]
    return _record(settings, "fewshot", dataset, shots, seed, method, trained, results, t0)


PROTOCOLS: dict[str, Callable[..., dict[str, Any]]] = {
    "base2new": run_base2new,
    "cross_dataset": run_cross_dataset,
    "dg": run_domain_generalization,
    "fewshot": run_fewshot,
}


def run_protocol(name: str, settings: RunSettings, dataset: str, shots: int, seed: int,
                 run_dir: Path | None = None, **kwargs: Any) -> dict[str, Any] | None:
    """Run protocol ``name``; returns its record (``None`` in processes that do not evaluate)."""
    if name not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {name!r}; choose one of {sorted(PROTOCOLS)}")
    return PROTOCOLS[name](settings, dataset=dataset, shots=shots, seed=seed, run_dir=run_dir, **kwargs)


def run_protocol_many(name: str, settings: list[RunSettings], dataset: str, shots: int, seed: int,
                      targets: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """Run protocol ``name`` for several methods on one backbone at once (``settings[i]`` names method
    i, its config and its ``train_fn``, e.g. a checkpoint loader); returns one record per method, the
    records :func:`run_protocol` gives each. Every method is built and prepared (trained, or loaded)
    first; then each test set is read once and evaluated for all of them by :func:`evaluate_items_many`,
    which computes the frozen image-tower blocks the methods share once per image. A record's
    ``seconds`` is the time of the whole group. For evaluation (no run directories: training runs
    write theirs one method at a time, with :func:`run_protocol`)."""
    if name not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {name!r}; choose one of {sorted(PROTOCOLS)}")
    if not settings:
        raise ConfigError("run_protocol_many needs at least one method")
    t0 = time.perf_counter()
    transfer = name in ("cross_dataset", "dg")
    if targets is None and transfer:
        targets = CROSS_DATASET_TARGETS if name == "cross_dataset" else DG_TARGETS
    if name in ("base2new", "cross_dataset"):
        for s in settings:
            _require_unseen_classes(s, name)
    if transfer:
        _require_target_images(settings[0], tuple(targets))
    prepared = [_prepare(s, dataset, shots, seed, None, train_classes="base" if name == "base2new" else "all")
                for s in settings]
    few, methods = prepared[0][0], [method for _, method, _ in prepared]

    def ev(splits: DatasetSplits, data: str, desc: str, split: str = "all") -> list[dict[str, Any]]:
        return evaluate_items_many(settings, methods, splits, data, desc, split)

    if name == "base2new":
        results = _base2new_results(ev, few, dataset)
    elif transfer:
        results = _transfer_results(ev, few, dataset, tuple(targets), settings[0].root)
    else:
        results = _fewshot_results(ev, few, dataset)
    return [_record(s, name, dataset, shots, seed, method, trained, r, t0)
            for s, (_, method, trained), r in zip(settings, prepared, results)]


def record_path(out_dir: Path, record: dict[str, Any]) -> Path:
    """``<out>/<protocol>/<method>/<dataset>/shots_<K>-seed_<S>.json``; the evaluation of a trained
    checkpoint (a record naming its ``checkpoint``) is ``shots_<K>-seed_<S>.eval.json`` beside it, so
    it never replaces the training record of the same run."""
    kind = ".eval" if record.get("checkpoint") else ""
    return (Path(out_dir) / record["protocol"] / record["method"] / record["dataset"]
            / f"shots_{record['shots']}-seed_{record['seed']}{kind}.json")
