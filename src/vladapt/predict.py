"""Inference with a trained (or zero-shot) method: class probabilities for image files.

    from vladapt import Predictor

    predictor = Predictor.from_checkpoint("runs/base2new/heba/dtd/shots_16-seed_1")
    for p in predictor.predict(["cat.jpg", "photos/"], top_k=3).predictions:
        print(p["image"], p["top"])          # [("banded", 0.91), ("striped", 0.05), ...]
    predictor.set_classes(["cat", "dog"])    # methods that classify unseen classes take any names

A run directory's checkpoint plus the backbone's weights is all it needs: the method, its config,
the class names, the backbone name and preprocessing come from the checkpoint's sidecar
(``checkpoint/meta.json``); the backbone's weights fingerprint must match the one it was trained on.
:meth:`Predictor.zero_shot` needs no checkpoint, only class names.

Images are decoded for what users actually have: EXIF orientation applied; grayscale, palette,
CMYK and 16-bit images converted to RGB; transparency composited on white; images above
``max_pixels`` refused before they are decoded (decompression-bomb guard). An unreadable image is an
error naming the file (``on_bad_image="error"``, the default) or is skipped and reported
(``"skip"``). Inputs may be image files, folders (searched recursively for image files, in sorted
order) and CSV lists (a ``path`` or ``image`` column, else the first column; relative paths are
relative to the CSV file).
"""

from __future__ import annotations

import csv
import io
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from vladapt.errors import ConfigError, DataError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
# PIL's own default guard (about 89 megapixels warns, twice that raises); vladapt refuses above it.
DEFAULT_MAX_PIXELS = 89_478_485
BAD_IMAGE_POLICIES = ("error", "skip")


def open_rgb(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, draft: int | None = None) -> Image.Image:
    """Decode ``path`` as an upright 8-bit RGB image; any failure is a :class:`DataError` naming the file.

    The size is checked against ``max_pixels`` from the header, before any pixel is decoded (PIL's own
    guard still refuses images above twice its limit of about 89 megapixels). ``draft``: a JPEG may be
    decoded at a reduced scale whose shorter side stays at least ``draft`` pixels (much faster for
    large photos that are resized to the model's input anyway)."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit below decides
            with Image.open(path) as image:
                w, h = image.size
                if w * h > max_pixels:
                    raise DataError(f"image {path} has {w} x {h} pixels, above the limit of {max_pixels:,} "
                                    "(a guard against decompression bombs); resize it, or raise max_pixels "
                                    "(--max-pixels) if you trust the file")
                if draft is not None and image.format == "JPEG":
                    image.draft("RGB", (draft, draft))
                image.load()
                return to_rgb(ImageOps.exif_transpose(image))
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"image {path} not found") from None
    except IsADirectoryError:
        raise DataError(f"{path} is a folder, not an image") from None
    except Image.DecompressionBombError as err:
        raise DataError(f"image {path} is too large to decode safely ({err})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise DataError(f"cannot read image {path}: {err}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode: 16/32-bit grayscale rescaled to 0-255, transparency on white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Image paths from files, folders (recursive, sorted) and CSV lists; a missing input is an error."""
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise DataError(f"folder {p} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            paths += found
        elif p.suffix.lower() == ".csv":
            paths += _read_csv_list(p)
        elif p.is_file() or p.suffix.lower() in IMAGE_SUFFIXES:
            paths.append(p)  # a missing image file is reported by the decoder (error or skip)
        else:
            raise DataError(f"input {p} does not exist (give image files, folders or a CSV list)")
    return paths


def _read_csv_list(path: Path) -> list[Path]:
    if not path.is_file():
        raise DataError(f"CSV list {path} does not exist")
    try:
        rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8-sig"))))
    except (UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"cannot read the CSV list {path}: {err}") from None
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        raise DataError(f"CSV list {path} is empty")
    header = [c.strip().lower() for c in rows[0]]
    column = next((header.index(k) for k in ("path", "image", "file", "filename") if k in header), None)
    body = rows[1:] if column is not None else rows
    column = column or 0
    out = []
    for i, row in enumerate(body, 2 if body is not rows else 1):
        if column >= len(row) or not row[column].strip():
            raise DataError(f"CSV list {path}, line {i}: no image path in column {column + 1}")
        p = Path(row[column].strip())
        out.append(p if p.is_absolute() else path.parent / p)
    return out


@dataclass
class PredictionResult:
    """``predictions``: one ``{"image": path, "top": [(class, probability), ...]}`` per decoded image;
    ``skipped``: ``{"image": path, "error": message}`` per image skipped with ``on_bad_image="skip"``."""

    predictions: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        rows = [{"image": p["image"], "top": [{"class": c, "probability": round(q, 6)} for c, q in p["top"]]}
                for p in self.predictions]
        return json.dumps({"predictions": rows, "skipped": self.skipped, "classes": self.classes}, indent=2,
                          ensure_ascii=False, allow_nan=False) + "\n"

    def to_csv(self) -> str:
        k = max((len(p["top"]) for p in self.predictions), default=0)
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["image"] + [f"{name}_{i}" for i in range(1, k + 1) for name in ("class", "probability")])
        for p in self.predictions:
            w.writerow([p["image"]] + [v for c, q in p["top"] for v in (c, f"{q:.6f}")])
        return buf.getvalue()

    def write(self, path: str | Path) -> Path:
        """Write ``.json`` or ``.csv`` (by the suffix), atomically."""
        from vladapt.io import atomic_write_text

        path = Path(path)
        if path.suffix.lower() == ".json":
            return atomic_write_text(path, self.to_json())
        if path.suffix.lower() == ".csv":
            return atomic_write_text(path, self.to_csv())
        raise ConfigError(f"output {path}: give a .json or .csv file name")


class Predictor:
    """A method over a fixed class list, ready to classify images (see the module docstring)."""

    def __init__(self, method, *, device: str | torch.device = "cpu", batch_size: int = 32,
                 max_pixels: int = DEFAULT_MAX_PIXELS, source: dict[str, Any] | None = None) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        self.method = method.to(device).eval()
        self.backbone = method.backbone
        self.device = device
        self.batch_size = batch_size
        self.max_pixels = max_pixels
        self.source = source or {}
        self._trained_classes = list(method.classnames)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_checkpoint(cls, run_dir: str | Path, classes: Sequence[str] | None = None, *, model: str | None = None,
                        pretrained: str | None = None, device: str | torch.device = "cpu", batch_size: int = 32,
                        max_pixels: int = DEFAULT_MAX_PIXELS, method_config: dict[str, Any] | None = None
                        ) -> Predictor:
        """Load a run directory's checkpoint (``vladapt train`` writes one per run) and its backbone.

        ``model`` / ``pretrained`` replace the backbone name / weights recorded in the checkpoint (the
        weights must still be the ones it was trained with: their fingerprint is checked).
        ``classes``: class names to predict over (default: the classes it was trained on).
        ``method_config``: keys that replace the checkpoint's method config, for settings that only
        change inference (e.g. ``{"strict_descriptions": False}`` to give new classes without
        descriptions the fallback prompt); a change of the weights' shapes is an error."""
        from vladapt.backbones import load_clip
        from vladapt.engine.checkpoint import load_checkpoint, read_meta
        from vladapt.methods import create_method

        meta = read_meta(run_dir)
        for key in ("method", "method_config", "backbone", "classnames"):
            if key not in meta:
                raise ConfigError(f"checkpoint {run_dir}: meta.json lacks {key!r}; it was not written by "
                                  "`vladapt train` (train the run again)")
        bb = meta["backbone"]
        backbone = load_clip(model or bb["name"], pretrained if pretrained is not None else bb.get("pretrained"),
                             device=device)
        config = {**meta["method_config"], **(method_config or {})}
        method = create_method(meta["method"], backbone, list(meta["classnames"]), config)
        method.set_classnames(list(meta["classnames"]), dataset=meta.get("dataset"), split="train")
        load_checkpoint(run_dir, method, backbone.fingerprint)
        predictor = cls(method, device=device, batch_size=batch_size, max_pixels=max_pixels,
                        source={"checkpoint": str(run_dir), "method": meta["method"], "dataset": meta.get("dataset")})
        predictor.set_classes(classes if classes else list(meta["classnames"]))
        return predictor

    @classmethod
    def zero_shot(cls, classes: Sequence[str], model: str = "vladapt-tiny", pretrained: str | None = None, *,
                  templates: str | list[str] | None = None, device: str | torch.device = "cpu",
                  batch_size: int = 32, max_pixels: int = DEFAULT_MAX_PIXELS) -> Predictor:
        """Zero-shot CLIP over ``classes`` (``templates``: a template, a list or an ensemble name)."""
        from vladapt.backbones import load_clip
        from vladapt.methods import create_method

        if not classes:
            raise ConfigError("zero-shot prediction needs class names (--classes)")
        backbone = load_clip(model, pretrained, device=device)
        config = {"templates": templates} if templates is not None else None
        method = create_method("zeroshot", backbone, list(classes), config)
        predictor = cls(method, device=device, batch_size=batch_size, max_pixels=max_pixels,
                        source={"method": "zeroshot", "model": model})
        predictor.set_classes(list(classes))
        return predictor

    # ------------------------------------------------------------------ classes
    @property
    def classes(self) -> list[str]:
        return list(self.method.classnames)

    def set_classes(self, classes: Sequence[str]) -> None:
        """Predict over ``classes`` from now on. The trained classes are evaluated as the method
        evaluates base classes; a list with other names as it evaluates new ones (methods that cannot
        classify unseen classes refuse them with an error)."""
        classes = [str(c).strip() for c in classes]
        if not classes or any(not c for c in classes):
            raise ConfigError("class names must be non-empty")
        dupes = sorted({c for c in classes if classes.count(c) > 1})
        if dupes:
            raise ConfigError(f"class names must be unique; repeated: {dupes}")
        trained = self._trained_classes
        if classes == trained:
            split = "base"
        elif not set(classes) & set(trained):
            split = "new"
        else:
            split = "all"
        if split != "base" and not getattr(self.method, "unseen_classes", True):
            unknown = [c for c in classes if c not in trained]
            if unknown:
                raise ConfigError(f"method {self.source.get('method', '')!r} classifies only the classes it was "
                                  f"fitted on; unknown: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
        self.method.set_classnames(classes, split=split)

    # ------------------------------------------------------------------ prediction
    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, C]`` of preprocessed images ``[B, 3, H, W]`` (the backbone's test transform)."""
        return self.method(images.to(self.device)).float()

    def predict(self, inputs: Sequence[str | Path | Image.Image], top_k: int = 5, on_bad_image: str = "error",
                progress: bool = False) -> PredictionResult:
        """Top-``top_k`` classes with probabilities (softmax of the logits) for each input image."""
        from tqdm.auto import tqdm

        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise ConfigError(f"on_bad_image must be one of {list(BAD_IMAGE_POLICIES)}, got {on_bad_image!r}")
        if top_k < 1:
            raise ConfigError(f"top_k must be at least 1, got {top_k}")
        items: list[tuple[str, Any]] = []
        for x in inputs:
            if isinstance(x, Image.Image):
                items.append((f"<image {len(items)}>", x))
            else:
                items += [(str(p), p) for p in expand_inputs([x])]
        result = PredictionResult(classes=self.classes)
        k = min(top_k, len(result.classes))
        transform = self.backbone.test_transform
        bar = tqdm(total=len(items), desc="predict", disable=not progress, leave=False)
        for start in range(0, len(items), self.batch_size):
            names, tensors = [], []
            for name, x in items[start:start + self.batch_size]:
                try:
                    image = (to_rgb(ImageOps.exif_transpose(x)) if isinstance(x, Image.Image)
                             else open_rgb(x, self.max_pixels, draft=self.backbone.image_size))
                except DataError as err:
                    if on_bad_image == "error":
                        raise DataError(f"{err} (--on-bad-image skip skips unreadable images)") from None
                    result.skipped.append({"image": name, "error": str(err)})
                    continue
                names.append(name)
                tensors.append(transform(image))
            if tensors:
                probs = torch.softmax(self.logits(torch.stack(tensors)), dim=-1).cpu()
                values, indices = probs.topk(k, dim=-1)
                for name, v, i in zip(names, values.tolist(), indices.tolist()):
                    result.predictions.append({"image": name, "top": [(result.classes[j], q) for j, q in zip(i, v)]})
            bar.update(len(items[start:start + self.batch_size]))
        bar.close()
        return result
