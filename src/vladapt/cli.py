"""The ``vladapt`` command."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Sequence

from vladapt import __version__
from vladapt.errors import VladaptError

DEFAULT_MODEL = "vladapt-tiny"


def _add_backbone_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="backbone: a vladapt tiny config or an open_clip model name, e.g. ViT-B-16-quickgelu "
                        f"(default: {DEFAULT_MODEL}, the bundled tiny CLIP; with --checkpoint: the checkpoint's)")
    p.add_argument("--pretrained", default=None,
                   help="open_clip pretrained tag (e.g. openai) or a local weights file "
                        "(OpenAI TorchScript .pt, state dict or .safetensors); default: the model's own weights "
                        "(random for test configs)")
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="precision of the frozen backbone and of autocast (default: %(default)s: bf16 on GPUs and "
                        "on CPUs with native bf16 instructions, fp16 on older GPUs, else fp32)")


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (shots per class; 0 or a negative number never means "all")."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 image per class, got {value}")
    return value


IMAGE_CACHE_HELP = ("where evaluation keeps the test images decoded, resized and center-cropped once (uint8 arrays "
                    "keyed by the image files and the transform), so later evaluations of image-level methods skip "
                    "decoding; a folder grows by N x H x W x 3 bytes per test split (default: off; 'none': off)")


def _add_protocol_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--protocol", required=required, choices=["base2new", "cross_dataset", "dg", "fewshot"])
    p.add_argument("--dataset", required=required,
                   help="dataset name (the source dataset for cross_dataset and dg, normally imagenet), or folder / "
                        "csv / json for custom data")
    p.add_argument("--root", type=Path, required=True,
                   help="data root holding the dataset folders (custom data: the folder or list file)")
    p.add_argument("--shots", type=_positive_int, nargs="+", default=None, help="shots per class (default: 16)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="run seeds (default: 1; the field uses 1 2 3)")
    p.add_argument("--targets", nargs="+", default=None, help="override the target datasets of cross_dataset / dg")
    _add_backbone_args(p)
    p.add_argument("--batch-size", type=int, default=64, help="evaluation batch size (default: %(default)s)")
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    p.add_argument("--out", type=Path, default=Path("runs"), help="output directory (default: runs)")
    p.add_argument("--feature-cache", default=None, metavar="DIR",
                   help="where feature-level methods keep frozen image features across runs (default: "
                        "$VLADAPT_FEATURE_CACHE or ~/.cache/vladapt/features; 'none': memory only)")
    p.add_argument("--image-cache", default=None, metavar="DIR", help=IMAGE_CACHE_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _dtype(args: argparse.Namespace, train: str | None = None):
    """The backbone's storage dtype for ``--precision`` (``auto``: the fastest one on ``--device``, or
    the run's explicit ``train.precision``)."""
    from vladapt.engine.precision import storage_dtype

    return storage_dtype(args.precision, args.device, train)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vladapt",
        description="Few-shot adaptation of frozen CLIP-style vision-language models.",
    )
    parser.add_argument("--version", action="version", version=f"vladapt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    info = sub.add_parser("info", help="versions, available backbones, methods and datasets")
    info.add_argument("--json", action="store_true", help="print machine-readable JSON")
    info.set_defaults(func=cmd_info)

    zs = sub.add_parser("zeroshot", help="zero-shot CLIP accuracy on an image folder or a dataset split")
    src = zs.add_mutually_exclusive_group(required=True)
    src.add_argument("--folder", type=Path, help="image folder with one sub-folder per class (all images are evaluated)")
    src.add_argument("--dataset", help="registered dataset name (see `vladapt info`); needs --root")
    zs.add_argument("--root", type=Path, help="data root holding the dataset folders (with --dataset)")
    zs.add_argument("--split", default="test", choices=["train", "val", "test"], help="split of --dataset (default: test)")
    _add_backbone_args(zs)
    zs.add_argument("--templates", default="dataset",
                    help="'dataset' (CoOp's template for the dataset; 'a photo of a {}.' otherwise), an ensemble "
                         "(openai_imagenet, simple_imagenet) or one template with {} for the class name")
    zs.add_argument("--batch-size", type=int, default=64)
    zs.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    zs.add_argument("--out", type=Path, default=None, help="result JSON (default: runs/zeroshot-<data>.json)")
    zs.add_argument("--quiet", action="store_true", help="no progress bars")
    zs.set_defaults(func=cmd_zeroshot)

    ev = sub.add_parser("eval", help="evaluate a method (training-free, or from a checkpoint) through a protocol")
    ev.add_argument("--method", default="zeroshot", help="method name (see `vladapt info`)")
    ev.add_argument("--checkpoint", type=Path, nargs="+", default=None, metavar="RUN_DIR",
                    help="run directory of `vladapt train`: evaluate its trained weights (method, config, dataset, "
                         "shots and seed come from the checkpoint). Several run directories are evaluated together "
                         "on one test set, each still writing its own record: every test image is read once and "
                         "the frozen image-tower blocks in front of each method's first adapted block (MMA and "
                         "RMAdapter: blocks 1-4) are computed once for all of them. They must share protocol, "
                         "dataset, shots, seed and backbone (an error otherwise: evaluate such checkpoints in "
                         "separate calls)")
    _add_protocol_args(ev, required=False)
    ev.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                    help="method config overrides, e.g. method.templates=openai_imagenet")
    ev.set_defaults(func=cmd_eval)

    tr = sub.add_parser("train", help="train a method through a protocol (base2new: train on base, evaluate base and new)")
    tr.add_argument("--method", required=True, help="method name (see `vladapt info`)")
    tr.add_argument("--config", type=Path, default=None,
                    help="YAML run config with sections method/train, optionally extending another file "
                         "(extends: base.yaml, relative to it) (default: vladapt's config for the method and protocol)")
    tr.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    _add_protocol_args(tr, required=True)
    tr.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                    help="config overrides, e.g. train.lr=0.01 method.scale=0.05")
    tr.set_defaults(func=cmd_train)

    pr = sub.add_parser("predict", help="classify image files with a trained run's checkpoint (or zero-shot CLIP): "
                                        "top-k classes with probabilities")
    pr.add_argument("images", nargs="+", metavar="IMAGE",
                    help="image files, folders (searched recursively) or CSV lists (a path column)")
    source = pr.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="run directory of `vladapt train` (method, config, class names "
                                                        "and backbone come from its checkpoint)")
    source.add_argument("--zeroshot", action="store_true", help="zero-shot CLIP over --classes (no checkpoint)")
    pr.add_argument("--classes", default=None,
                    help="comma-separated class names to predict over (default: the checkpoint's classes; "
                         "methods that classify unseen classes take any names)")
    pr.add_argument("--classes-file", type=Path, default=None, help="class names, one per line")
    pr.add_argument("--model", default=None, help="backbone (default: the checkpoint's; with --zeroshot vladapt-tiny)")
    pr.add_argument("--pretrained", default=None, help="backbone weights: open_clip tag or local file "
                                                      "(default: the checkpoint's)")
    pr.add_argument("--top-k", type=_positive_int, default=5, help="classes listed per image (default: %(default)s)")
    pr.add_argument("--output", type=Path, default=None, help="also write the predictions to a .csv or .json file")
    pr.add_argument("--on-bad-image", choices=["error", "skip"], default="error",
                    help="an unreadable image stops the run (error, the default) or is skipped and reported (skip)")
    pr.add_argument("--max-pixels", type=_positive_int, default=None,
                    help="refuse larger images (decompression-bomb guard; default: about 89 megapixels)")
    pr.add_argument("--set", action="append", default=[], dest="method_overrides", metavar="method.KEY=VALUE",
                    help="change an inference setting of the checkpoint's method config, e.g. "
                         "--set method.strict_descriptions=false (repeatable)")
    pr.add_argument("--batch-size", type=_positive_int, default=32)
    pr.add_argument("--device", default="cpu")
    pr.add_argument("--quiet", action="store_true", help="no progress bar and no per-image lines")
    pr.set_defaults(func=cmd_predict)

    data = sub.add_parser("data", help="dataset tools")
    data_sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    check = data_sub.add_parser("check", help="report every problem of a dataset layout at once, with counts per split")
    check.add_argument("--dataset", required=True, help="dataset name, or folder / csv / json for custom data")
    check.add_argument("--root", type=Path, required=True,
                       help="data root (benchmark datasets) or the image folder / list file (custom data)")
    check.add_argument("--no-images", action="store_true", help="skip opening every image (existence is still checked)")
    check.add_argument("--fast", action="store_true",
                       help="only read each image's header instead of decoding it (faster; misses truncated files)")
    check.add_argument("--all", action="store_true", help="list every problem and bad file (default: the first 20 of each kind)")
    check.add_argument("--output", type=Path, default=None, metavar="FILE",
                       help="also write the full report, every bad file listed, to FILE")
    check.add_argument("--quiet", action="store_true", help="no progress bar")
    check.set_defaults(func=cmd_data_check)

    demo = sub.add_parser("demo", help="the whole pipeline on the embedded default: synthetic data, the bundled tiny "
                                       "CLIP, zero-shot and trained methods through base-to-new")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory (default: %(default)s)")
    demo.add_argument("--methods", nargs="+", default=None, help="methods (default: zeroshot heba mma rmadapter lathadapter; 'all': every method "
                      "that classifies unseen classes)")
    demo.add_argument("--datasets", nargs="+", default=None, help="synthetic datasets (default: all)")
    demo.add_argument("--seeds", type=int, nargs="+", default=[1], help="run seeds (default: 1)")
    demo.add_argument("--shots", type=_positive_int, default=16, help="shots per class (default: %(default)s)")
    demo.add_argument("--model", default="vladapt-tiny", help="backbone (default: the bundled %(default)s)")
    demo.add_argument("--per-class", type=int, nargs=3, default=[40, 10, 30], metavar=("TRAIN", "VAL", "TEST"),
                      help="images per class written for each split (default: 40 10 30)")
    demo.add_argument("--image-cache", default=None, metavar="DIR", help=IMAGE_CACHE_HELP)
    demo.add_argument("--quiet", action="store_true", help="no progress output")
    demo.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                      help="config overrides for the trained methods, e.g. train.epochs=5")
    demo.set_defaults(func=cmd_demo)

    # --- vladapt report (paper-style tables and plots of a results folder) ---
    rep = sub.add_parser("report", help="paper-style tables and plots of a results folder: Markdown, CSV, LaTeX and "
                                        "one self-contained HTML page")
    rep.add_argument("results", type=Path, metavar="RESULTS_DIR",
                     help="folder holding result records (<protocol>/<method>/<dataset>/shots_K-seed_S.json)")
    rep.add_argument("--out", type=Path, default=None, help="output folder (default: RESULTS_DIR/report)")
    rep.add_argument("--formats", nargs="+", choices=["md", "csv", "tex", "html"], default=["md", "csv", "tex", "html"],
                     help="report formats to write (default: all); the PNG plots are always written")
    rep.add_argument("--published", action="store_true",
                     help="add the published numbers (ViT-B/16, 16 shots, from the papers) and ours - published")
    rep.set_defaults(func=cmd_report)
    _add_bench_parser(sub)

    synth = sub.add_parser("synth", help="the synthetic image-text world")
    synth_sub = synth.add_subparsers(dest="synth_command", metavar="SUBCOMMAND", required=True)
    pre = synth_sub.add_parser("pretrain", help="pretrain the tiny CLIP on the synthetic world (the bundled "
                                                "vladapt-tiny weights come from this command)")
    pre.add_argument("--out", type=Path, required=True, help="weights file to write (.safetensors; a .json sidecar "
                                                             "is written next to it)")
    pre.add_argument("--log", type=Path, default=None, help="JSON-lines log of the loss and zero-shot probe curves")
    for flag, typ, help_ in (
        ("--steps", int, "optimizer steps"), ("--batch-size", int, "image-caption pairs per step"),
        ("--seed", int, "seed of the data stream and the initialization"), ("--lr", float, "peak AdamW learning rate"),
        ("--weight-decay", float, "AdamW weight decay (matrices only)"), ("--warmup-steps", int, "linear warm-up"),
        ("--min-lr-ratio", float, "final / peak learning rate of the cosine"), ("--grad-clip", float, "0 = off"),
        ("--precision", str, "fp32 or bf16 (autocast)"), ("--shifted-fraction", float,
                                                           "share of images in mild downstream styles"),
        ("--shift-strength", float, "strength of those styles"), ("--eval-every", int, "steps between probe evaluations"),
        ("--probe-per-class", int, "probe images per class"), ("--threads", int, "torch threads (recorded: the "
                                                                              "thread count changes the last bits)"),
    ):
        pre.add_argument(flag, type=typ, default=None, help=f"{help_} (default: the bundled model's setting)")
    pre.add_argument("--quiet", action="store_true", help="no progress bar")
    pre.set_defaults(func=cmd_synth_pretrain)
    folder = synth_sub.add_parser("folder", help="write a small generated image folder (one sub-folder per class)")
    folder.add_argument("out", type=Path, help="output folder")
    folder.add_argument("--per-class", type=int, default=8)
    folder.add_argument("--seed", type=int, default=0)
    folder.set_defaults(func=cmd_synth_folder)
    return parser


def cmd_info(args: argparse.Namespace) -> int:
    import open_clip
    import torch

    from vladapt.backbones import available_backbones
    from vladapt.data import list_datasets
    from vladapt.methods import list_methods

    backbones = available_backbones()
    info = {
        "vladapt": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "cuda_available": torch.cuda.is_available(),
        "backbones": backbones,
        "methods": {name: {"trainable": m.trainable} for name, m in list_methods().items()},
        "datasets": list_datasets(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"vladapt {info['vladapt']}  (python {info['python']}, torch {info['torch']}, open_clip {info['open_clip']}, "
          f"CUDA {'available' if info['cuda_available'] else 'not available'})")
    print(f"backbones, vladapt tiny configs: {', '.join(backbones['tiny'])}")
    print(f"backbones, open_clip architectures ({len(backbones['open_clip'])}): {', '.join(backbones['open_clip'])}")
    print("  weights: --pretrained TAG (open_clip tag, needs the hub or its cache) or --pretrained FILE")
    print("methods: " + ", ".join(f"{n}{'' if m['trainable'] else ' (training-free)'}" for n, m in info["methods"].items()))
    print("datasets: " + ", ".join(info["datasets"]))
    return 0


def _eval_items(args: argparse.Namespace):
    """(name, dataset key, image root, items, classnames) to evaluate, from --folder or --dataset/--root."""
    from vladapt.data import load_dataset
    from vladapt.data.custom import load_custom
    from vladapt.errors import ConfigError

    if args.folder is not None:
        splits = load_custom(args.folder, save_split=False)
        return splits.name, "folder", splits.image_root, splits.train + splits.val + splits.test, splits.classnames
    if args.root is None:
        raise ConfigError("--dataset needs --root DIR (the folder that holds the dataset folders)")
    splits = load_dataset(args.dataset, args.root)
    return args.dataset, args.dataset, splits.image_root, getattr(splits, args.split), splits.classnames


def cmd_zeroshot(args: argparse.Namespace) -> int:
    from torch.utils.data import DataLoader

    from vladapt.backbones import load_clip
    from vladapt.data import ImageDataset
    from vladapt.engine import evaluate
    from vladapt.engine.precision import precision_name
    from vladapt.io import atomic_write_json
    from vladapt.methods import create_method

    t0 = time.perf_counter()
    name, dataset_key, image_root, items, classnames = _eval_items(args)
    backbone = load_clip(args.model or DEFAULT_MODEL, args.pretrained, device=args.device,
                         dtype=_dtype(args))
    method = create_method("zeroshot", backbone, classnames,
                           {"templates": args.templates, "dataset": None if dataset_key == "folder" else dataset_key})
    method.progress = not args.quiet
    loader = DataLoader(ImageDataset(items, image_root, backbone.test_transform), batch_size=args.batch_size,
                        shuffle=False, num_workers=args.workers)
    result = evaluate(method, loader, len(classnames), device=args.device, progress=not args.quiet, desc="zero-shot")
    record = {
        "vladapt_version": __version__,
        "method": "zeroshot",
        "backbone": {"name": backbone.name, "pretrained": backbone.pretrained, "fingerprint": backbone.fingerprint,
                     "precision": precision_name(backbone.model.dtype)},
        "data": {"source": str(args.folder) if args.folder is not None else f"{args.dataset}:{args.split}",
                 "num_images": len(items), "num_classes": len(classnames)},
        "templates": method.templates,
        "accuracy": result.accuracy,
        "correct": result.correct,
        "total": result.total,
        "macro_f1": result.macro_f1,
        "per_class_accuracy": {
            c: (100.0 * k / n if n else None)
            for c, k, n in zip(classnames, result.per_class_correct, result.per_class_total)
        },
        "seconds": round(time.perf_counter() - t0, 3),
    }
    out = args.out if args.out is not None else Path("runs") / f"zeroshot-{name}.json"
    atomic_write_json(out, record)
    weights = backbone.pretrained or "random weights"
    print(f"zero-shot CLIP | backbone {backbone.name} ({weights}, fingerprint {backbone.fingerprint})")
    print(f"data {record['data']['source']}: {len(items)} images, {len(classnames)} classes, "
          f"{len(method.templates)} template(s)")
    print(f"accuracy {result.accuracy:.2f}% ({result.correct}/{result.total})  macro-F1 {result.macro_f1:.2f}  "
          f"chance {100.0 / len(classnames):.2f}%")
    width = max(len(c) for c in classnames)
    for c, acc in record["per_class_accuracy"].items():
        print(f"  {c:<{width}}  {'-' if acc is None else f'{acc:6.2f}%'}")
    print(f"result written to {out}")
    return 0


def _settings(args: argparse.Namespace, backbone, method: str, method_config: dict):
    from vladapt.protocols.runner import RunSettings

    from vladapt.data.decoded import image_cache_option
    from vladapt.engine.feature_cache import FeatureCache, cache_dir_option

    root = cache_dir_option(getattr(args, "feature_cache", None))
    return RunSettings(backbone=backbone, root=args.root, method=method, method_config=method_config,
                       device=args.device, batch_size=args.batch_size, workers=args.workers,
                       progress=not args.quiet, feature_cache=FeatureCache(root),
                       image_cache=image_cache_option(getattr(args, "image_cache", None)))


def _run_grid(args: argparse.Namespace, settings, protocol: str, dataset: str, shots: list[int], seeds: list[int],
              **kwargs) -> None:
    """Run the grid, printing one line per record, then the report (main process only)."""
    from vladapt.bench.grid import run_grid, summary_line
    from vladapt.engine import distributed as dist

    run_grid(settings, protocol, dataset, shots, seeds, args.out, targets=args.targets,
             on_record=lambda record, path: print(f"{summary_line(record)}  -> {path}"), **kwargs)
    if dist.is_main():
        print()
        print((args.out / "report.md").read_text(encoding="utf-8"))
        print(f"table written to {args.out / 'report.md'}")


def cmd_eval(args: argparse.Namespace) -> int:
    from vladapt.backbones import load_clip
    from vladapt.config import parse_overrides
    from vladapt.engine.checkpoint import read_meta
    from vladapt.errors import ConfigError

    overrides = parse_overrides(args.overrides)
    unknown = sorted(set(overrides) - {"method"})
    if unknown:
        raise ConfigError(f"unknown override section {unknown[0]!r}; overrides look like method.KEY=VALUE")
    if args.checkpoint is None:
        if args.protocol is None or args.dataset is None:
            raise ConfigError("eval needs --protocol and --dataset (or --checkpoint RUN_DIR)")
        backbone = load_clip(args.model or DEFAULT_MODEL, args.pretrained, device=args.device,
                             dtype=_dtype(args))
        settings = _settings(args, backbone, args.method, overrides.get("method", {}))
        _run_grid(args, settings, args.protocol, args.dataset, args.shots or [16], args.seeds or [1])
        return 0
    metas = [read_meta(c) for c in args.checkpoint]
    if overrides.get("method"):
        raise ConfigError("method overrides cannot change a trained checkpoint's configuration")
    meta = metas[0]

    def shared(m: dict, key: str):
        value = m.get(key)
        return tuple((value or {}).get(f) for f in ("name", "pretrained", "fingerprint")) if key == "backbone" else value

    for path, other in zip(args.checkpoint[1:], metas[1:]):
        for key in ("protocol", "dataset", "shots", "seed", "backbone"):
            mine, first = shared(other, key), shared(meta, key)
            if mine != first:
                raise ConfigError(f"--checkpoint: {path} has {key} {mine!r}, but {args.checkpoint[0]} has {first!r}; "
                                  "checkpoints evaluated together must share protocol, dataset, shots, seed and "
                                  "backbone: evaluate the others in a separate `vladapt eval` call")
    bb = meta["backbone"]
    same = args.model is None or args.model == bb["name"]
    backbone = load_clip(bb["name"] if same else args.model,
                         (bb["pretrained"] if same else None) if args.pretrained is None else args.pretrained,
                         device=args.device, dtype=_dtype(args))
    protocol, dataset = args.protocol or meta["protocol"], args.dataset or meta["dataset"]
    shots, seeds = args.shots or [meta["shots"]], args.seeds or [meta["seed"]]
    if len(metas) == 1:
        settings = _settings(args, backbone, meta["method"], meta["method_config"])
        _run_grid(args, settings, protocol, dataset, shots, seeds, checkpoint=args.checkpoint[0])
        return 0
    from vladapt.bench.grid import evaluate_checkpoints, summary_line

    settings = [_settings(args, backbone, m["method"], m["method_config"]) for m in metas]
    evaluate_checkpoints(settings, args.checkpoint, protocol, dataset, shots, seeds, args.out, targets=args.targets,
                         on_record=lambda record, path: print(f"{summary_line(record)}  -> {path}"))
    print()
    print((args.out / "report.md").read_text(encoding="utf-8"))
    print(f"table written to {args.out / 'report.md'}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from vladapt.backbones import load_clip
    from vladapt.engine import distributed as dist
    from vladapt.engine.runconfig import resolve_run_config

    dist.init_distributed(args.device)
    method_config, train_config = resolve_run_config(args.method, args.protocol, args.config, args.overrides)
    backbone = load_clip(args.model or DEFAULT_MODEL, args.pretrained, device=args.device,
                         dtype=_dtype(args, train_config.precision))
    settings = _settings(args, backbone, args.method, method_config)
    _run_grid(args, settings, args.protocol, args.dataset, args.shots or [16], args.seeds or [1],
              train_config=train_config, resume=args.resume)
    return 0


def _class_list(args: argparse.Namespace) -> list[str] | None:
    from vladapt.errors import ConfigError

    if args.classes is not None and args.classes_file is not None:
        raise ConfigError("give --classes or --classes-file, not both")
    if args.classes_file is not None:
        if not args.classes_file.is_file():
            raise ConfigError(f"--classes-file {args.classes_file} does not exist")
        names = [line.strip() for line in args.classes_file.read_text(encoding="utf-8").splitlines()]
        names = [n for n in names if n]
        if not names:
            raise ConfigError(f"--classes-file {args.classes_file} holds no class names")
        return names
    if args.classes is not None:
        names = [n.strip() for n in args.classes.split(",") if n.strip()]
        if not names:
            raise ConfigError("--classes: give comma-separated class names, e.g. --classes cat,dog")
        return names
    return None


def cmd_predict(args: argparse.Namespace) -> int:
    from vladapt.config import parse_overrides
    from vladapt.errors import ConfigError
    from vladapt.predict import DEFAULT_MAX_PIXELS, Predictor

    classes = _class_list(args)
    overrides = parse_overrides(args.method_overrides)
    if set(overrides) - {"method"}:
        raise ConfigError("--set takes method.KEY=VALUE (the checkpoint's method config), e.g. "
                          "--set method.strict_descriptions=false")
    if overrides and args.zeroshot:
        raise ConfigError("--set changes a checkpoint's method config; it does not apply with --zeroshot")
    if args.output is not None and args.output.suffix.lower() not in (".csv", ".json"):
        raise ConfigError(f"--output {args.output}: give a .csv or .json file name")
    common = {"device": args.device, "batch_size": args.batch_size, "max_pixels": args.max_pixels or DEFAULT_MAX_PIXELS}
    if args.zeroshot:
        if not classes:
            raise ConfigError("--zeroshot needs class names: --classes cat,dog or --classes-file FILE")
        predictor = Predictor.zero_shot(classes, args.model or DEFAULT_MODEL, args.pretrained, **common)
    else:
        predictor = Predictor.from_checkpoint(args.checkpoint, classes, model=args.model, pretrained=args.pretrained,
                                              method_config=overrides.get("method"), **common)
    result = predictor.predict(args.images, top_k=args.top_k, on_bad_image=args.on_bad_image,
                               progress=not args.quiet)
    if not args.quiet:
        for p in result.predictions:
            print(f"{p['image']}: " + ", ".join(f"{c} {q:.3f}" for c, q in p["top"]))
    if result.skipped:
        print(f"skipped {len(result.skipped)} unreadable image(s):", file=sys.stderr)
        for s in result.skipped:
            print(f"  {s['error']}", file=sys.stderr)
    if args.output is not None:
        path = result.write(args.output)
        if not args.quiet:
            print(f"{len(result.predictions)} predictions written to {path}")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from vladapt.data import check_dataset, format_report

    from vladapt.io import atomic_write_text

    report = check_dataset(args.dataset, args.root, verify_images=not args.no_images, decode=not args.fast,
                           quiet=args.quiet)
    print(format_report(report, max_listed=None if args.all else 20))
    longest = max(len(report.problems), len(report.missing), len(report.unreadable))
    if longest > 20 and not args.all and args.output is None:
        print("  (lists show their first 20 entries: --all prints every one, --output FILE writes them all to FILE)")
    if args.output is not None:
        atomic_write_text(args.output, format_report(report, max_listed=None) + "\n")
        print(f"full report written to {args.output}")
    return 0 if report.ok else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from vladapt.bench.demo import DemoSettings, run_demo

    settings = DemoSettings(out=args.out, methods=args.methods, datasets=args.datasets, seeds=args.seeds,
                            shots=args.shots, model=args.model, per_class=tuple(args.per_class),
                            overrides=args.overrides, progress=not args.quiet, image_cache=args.image_cache)
    if not args.quiet:
        print(f"vladapt demo: synthetic benchmark, backbone {args.model}, {args.shots} shots, seeds {args.seeds}")
    result = run_demo(settings)
    print(result["report"])
    print(f"records in {args.out / 'records'}, table {args.out / 'report.md'}, chart {result['chart']} "
          f"({result['seconds'] / 60:.1f} min)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from vladapt.bench.paper import write_report

    for path in write_report(args.results, args.out, formats=args.formats, published=args.published):
        print(path)
    return 0
# ---- vladapt bench (begin) ----
def _add_bench_parser(sub) -> None:
    b = sub.add_parser("bench", help="a resumable grid: methods x datasets x protocols x shots x seeds, on local "
                                     "worker processes or a Ray cluster (one record per run; done runs are skipped)")
    b.add_argument("--grid", type=Path, default=None,
                   help="YAML grid file with the keys below (methods, datasets, protocols, shots, seeds, root, out, "
                        "config_name, overrides, method_overrides, executor, workers, threads, ray_address, model, ...); "
                        "options given here replace its values, KEY=VALUE overrides apply after its overrides")
    b.add_argument("--methods", nargs="+", default=None, help="method names (see `vladapt info`)")
    b.add_argument("--datasets", nargs="+", default=None, help="dataset names (synthetic ones are written if missing)")
    b.add_argument("--protocols", nargs="+", default=None, choices=["base2new", "cross_dataset", "dg", "fewshot"])
    b.add_argument("--shots", type=_positive_int, nargs="+", default=None, help="shots per class (default: 16)")
    b.add_argument("--seeds", type=int, nargs="+", default=None, help="run seeds (default: 1)")
    b.add_argument("--root", type=Path, default=None, help="data root holding the dataset folders")
    b.add_argument("--out", type=Path, default=None, help="results folder (default: runs)")
    b.add_argument("--config-name", default=None, metavar="NAME",
                   help="use each method's packaged NAME.yaml where vladapt ships one (e.g. demo), else the "
                        "protocol's config")
    b.add_argument("--executor", choices=["local", "ray"], default=None, help="where runs execute (default: local)")
    b.add_argument("--workers", type=_positive_int, default=None,
                   help="local worker processes running at once; with ray, used for the default --threads (default: 1)")
    b.add_argument("--threads", type=_positive_int, default=None,
                   help="torch threads per run, and Ray CPUs per task (default: cores // workers)")
    b.add_argument("--ray-address", default=None, help="Ray cluster address (default: start a local instance)")
    b.add_argument("--model", default=None, help=f"backbone (default: {DEFAULT_MODEL})")
    b.add_argument("--pretrained", default=None, help="open_clip pretrained tag or a local weights file")
    b.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default=None,
                   help="backbone precision (default: auto, chosen on each worker's machine)")
    b.add_argument("--device", default=None, help="torch device (default: cpu)")
    b.add_argument("--targets", nargs="+", default=None, help="override the target datasets of cross_dataset / dg")
    b.add_argument("--feature-cache", default=None, metavar="DIR",
                   help="frozen-feature cache folder shared by the runs ('none': memory only)")
    b.add_argument("--image-cache", default=None, metavar="DIR", help=IMAGE_CACHE_HELP)
    b.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every run, e.g. train.epochs=5")
    b.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from vladapt.bench.bench import load_grid_file, make_spec, run_bench

    values = load_grid_file(args.grid) if args.grid is not None else {}
    for key in ("methods", "datasets", "protocols", "shots", "seeds", "root", "out", "config_name", "executor",
                "workers", "threads", "ray_address", "model", "pretrained", "precision", "device", "targets",
                "feature_cache", "image_cache"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    values["overrides"] = list(values.get("overrides") or []) + list(args.overrides)
    result = run_bench(make_spec(values), echo=lambda line: print(line, flush=True))
    return 0 if result.ok else 1
# ---- vladapt bench (end) ----


def cmd_synth_pretrain(args: argparse.Namespace) -> int:
    import dataclasses

    from vladapt.synth.pretrain import PretrainConfig, pretrain

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(PretrainConfig)
             if getattr(args, f.name, None) is not None}
    result = pretrain(PretrainConfig(**given), args.out, args.log, progress=not args.quiet)
    print(f"wrote {result['out_path']} and {result['sidecar_path']} (fingerprint {result['fingerprint']}, "
          f"{result['steps']} steps, {result['seconds'] / 60:.1f} min)")
    print(f"reproduce with: {result['command']}")
    return 0


def cmd_synth_folder(args: argparse.Namespace) -> int:
    from vladapt.synth.datasets import write_image_folder

    classes = write_image_folder(args.out, per_class=args.per_class, seed=args.seed)
    print(f"wrote {len(classes)} classes x {args.per_class} images to {args.out}: {', '.join(classes)}")
    return 0


# A config override: section.key[.key...]=value (train.lr=1e-3, method.layers=[9,12]).
_OVERRIDE = re.compile(r"^[A-Za-z_][\w-]*(?:\.[\w-]+)+=")


def _overrides_last(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """Move the ``key=value`` overrides of a command that takes them behind ``--``, wherever they were
    written: ``--shots 1 2 train.epochs=1 --seeds 3`` would otherwise hand ``train.epochs=1`` to
    ``--shots`` (an integer list). A token that is the value of an option taking one value
    (``--out a.b=c``) stays where it is."""
    if not argv or "--" in argv:
        return argv
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    command = sub.choices.get(argv[0]) if sub is not None else None
    if command is None or not any(a.dest == "overrides" for a in command._actions):
        return argv
    single = {o for a in command._actions for o in a.option_strings if a.nargs is None and a.const is None
              and not isinstance(a, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._HelpAction))}
    keep, moved = [], []
    for i, token in enumerate(argv):
        if i > 0 and _OVERRIDE.match(token) and argv[i - 1] not in single:
            moved.append(token)
        else:
            keep.append(token)
    return keep + ["--"] + moved if moved else keep


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    entry = argv is None  # the process is the `vladapt` command (not a call from Python code)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(_overrides_last(parser, argv))
    if args.command is None:
        parser.print_help()
        return 0
    if entry:
        from vladapt.host_memory import reuse_freed_memory

        reuse_freed_memory()  # large activation blocks are reused, not page-faulted in again every step
    import warnings

    try:
        with warnings.catch_warnings():  # warnings (e.g. an unwritable feature cache) as one line, like errors
            warnings.showwarning = lambda message, *rest, **kw: print(f"vladapt: warning: {message}", file=sys.stderr)
            return int(args.func(args) or 0)
    except VladaptError as e:
        print(f"vladapt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vladapt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
