"""Synthetic downstream classification datasets, written in the CoOp split-file layout.

Each dataset is rendered with a STRONG domain-shift style (the pretraining world mostly sees clean
images) and laid out exactly like the real benchmarks, so the ordinary readers load it::

    <root>/<name>/images/<class_folder>/<split>_<i>.png
    <root>/<name>/split_zhou_<SplitName>.json   {"train"|"val"|"test": [[path, label, classname], ...]}
    <root>/<name>/descriptions.json              {classname: [sentence, ...]}  (CuPL format)
    <root>/<name>/manifest.json                  generator version, seed, sizes, style, classes

Paths in the split file are relative to ``images/``; labels index the class names in sorted order;
class folders are the class names with spaces replaced by underscores.

| name           | split name    | classes | what decides the class          | style (strong)  |
|----------------|---------------|---------|---------------------------------|-----------------|
| synth_shapes   | SynthShapes   | 16      | colour and shape ("red star")   | outline         |
| synth_textures | SynthTextures | 12      | background pattern ("grid")     | low_contrast    |
| synth_counts   | SynthCounts   | 16      | count and shape ("three stars") | clutter + blur  |

synth_counts draws large objects only: at 64x64 pixels the tiny CLIP tells small shapes apart too
poorly for counting them to be the question.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from vladapt.errors import ConfigError, DataError
from vladapt.synth.captions import NUMBER_WORDS, PLURALS
from vladapt.synth.descriptions import describe_count, describe_pattern, describe_shape_color
from vladapt.synth.render import CLEAN, DEFAULT_SIZE, STRONG, Style, render, shifted
from vladapt.synth.scene import BACKGROUNDS, COLORS, SHAPES, Scene, sample_scene
from vladapt.synth.world import GENERATOR_VERSION

SPLITS = ("train", "val", "test")
DEFAULT_PER_CLASS = (40, 10, 30)
MANIFEST = "manifest.json"
DESCRIPTIONS = "descriptions.json"
IMAGE_ROOT = "images"


@dataclass(frozen=True)
class SynthDataset:
    """A synthetic downstream dataset: its classes, how to draw one of each, and its domain shift.

    ``classes`` maps each class name to the scene attributes it pins; ``shared`` constrains the
    remaining attributes for every class (see :func:`~vladapt.synth.scene.sample_scene`).
    ``describe(**attributes)`` builds the class's description bank.
    """

    name: str
    split_name: str
    classes: dict[str, dict[str, object]]
    style: Style
    describe: Callable[..., list[str]]
    shared: dict[str, object] = field(default_factory=dict)

    @property
    def classnames(self) -> list[str]:
        """Class names in label order (sorted)."""
        return sorted(self.classes)

    @property
    def split_file(self) -> str:
        return f"split_zhou_{self.split_name}.json"

    def scene(self, classname: str, rng: np.random.Generator) -> Scene:
        """A random scene of class ``classname``."""
        return sample_scene(rng, **self.shared, **self.classes[classname])

    def descriptions(self) -> dict[str, list[str]]:
        """The CuPL-format description bank ``{classname: [sentence, ...]}``."""
        return {c: self.describe(**self.classes[c]) for c in self.classnames}


_SHAPE_COLOR_CLASSES = (
    "red circle",
    "red star",
    "blue square",
    "blue heart",
    "green triangle",
    "green cross",
    "yellow star",
    "yellow diamond",
    "purple hexagon",
    "purple circle",
    "orange heart",
    "orange arrow",
    "pink diamond",
    "pink ring",
    "black cross",
    "black triangle",
)
_COUNT_SHAPES = ("circle", "square", "triangle", "star")


def _count_class(count: int, shape: str) -> str:
    return f"{NUMBER_WORDS[count]} {shape if count == 1 else PLURALS[shape]}"


DATASETS: dict[str, SynthDataset] = {
    d.name: d
    for d in (
        SynthDataset(
            name="synth_shapes",
            split_name="SynthShapes",
            classes={c: dict(zip(("color", "shape"), c.split())) for c in _SHAPE_COLOR_CLASSES},
            style=shifted("outline", STRONG),
            describe=describe_shape_color,
            shared={"count": (1, 2)},
        ),
        SynthDataset(
            name="synth_textures",
            split_name="SynthTextures",
            classes={b: {"background": b} for b in BACKGROUNDS},
            style=shifted("low_contrast", STRONG),
            describe=describe_pattern,
            shared={"count": (1, 2, 3)},
        ),
        SynthDataset(
            name="synth_counts",
            split_name="SynthCounts",
            classes={
                _count_class(n, shape): {"count": n, "shape": shape}
                for n in NUMBER_WORDS
                for shape in _COUNT_SHAPES
            },
            style=Style(clutter=STRONG, blur=STRONG),
            describe=describe_count,
            shared={"size": "large"},
        ),
    )
}


def description_overrides(config_cls: type, dataset: str, root: str | Path) -> list[str]:
    """``["method.descriptions=<root>/<dataset>/descriptions.json"]`` when ``dataset`` is synthetic and a
    method with config class ``config_cls`` takes a description bank (the synthetic datasets ship
    CuPL-style descriptions); else ``[]``."""
    if dataset in DATASETS and "descriptions" in getattr(config_cls, "__dataclass_fields__", {}):
        return [f"method.descriptions={Path(root) / dataset / DESCRIPTIONS}"]
    return []


def get_dataset(name: str) -> SynthDataset:
    """The registered synthetic dataset ``name`` (a key of :data:`DATASETS`)."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ConfigError(f"unknown synthetic dataset {name!r}; choose one of {sorted(DATASETS)}") from None


def class_folder(classname: str) -> str:
    """Folder name of a class: spaces become underscores (readers map them back)."""
    return classname.replace(" ", "_")


def _stable_key(text: str) -> int:
    # Python's hash() is salted per process; CRC32 gives the same stream on every run.
    return zlib.crc32(text.encode("utf-8"))


def _save_png(image: np.ndarray, path: Path) -> None:
    Image.fromarray(image).save(path, format="PNG", compress_level=1)


def _progress(items: Iterable, total: int, enabled: bool, desc: str) -> Iterable:
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, total=total, desc=desc)


def _manifest(spec: SynthDataset, seed: int, per_class: tuple[int, int, int], size: int) -> dict:
    return {
        "generator": "vladapt.synth",
        "generator_version": GENERATOR_VERSION,
        "dataset": spec.name,
        "seed": seed,
        "per_class": dict(zip(SPLITS, per_class)),
        "image_size": size,
        "style": asdict(spec.style),
        "classes": spec.classnames,
    }


def _is_complete(folder: Path, spec: SynthDataset, manifest: dict) -> bool:
    # The manifest is written last inside the temp dir and the dir is renamed into place in one
    # step, so a matching manifest means every image, split and description file is there.
    try:
        existing = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return existing == manifest and (folder / spec.split_file).is_file()


def _render_into(
    folder: Path, spec: SynthDataset, seed: int, per_class: tuple[int, int, int], size: int, progress: bool
) -> None:
    classnames = spec.classnames
    for cname in classnames:
        (folder / IMAGE_ROOT / class_folder(cname)).mkdir(parents=True)
    jobs = [
        (split_id, split, label, cname, i)
        for split_id, (split, n) in enumerate(zip(SPLITS, per_class))
        for label, cname in enumerate(classnames)
        for i in range(n)
    ]
    split: dict[str, list[list[object]]] = {s: [] for s in SPLITS}
    dataset_key = _stable_key(spec.name)
    for split_id, split_name, label, cname, i in _progress(jobs, len(jobs), progress, spec.name):
        rng = np.random.default_rng([seed, dataset_key, split_id, label, i])
        image = render(spec.scene(cname, rng), spec.style, rng, size)
        relative = f"{class_folder(cname)}/{split_name}_{i:04d}.png"
        _save_png(image, folder / IMAGE_ROOT / relative)
        split[split_name].append([relative, label, cname])
    (folder / spec.split_file).write_text(json.dumps(split, indent=4))
    (folder / DESCRIPTIONS).write_text(json.dumps(spec.descriptions(), indent=4))


def _check_per_class(per_class: tuple[int, int, int]) -> tuple[int, int, int]:
    message = f"per_class={per_class!r} must be three non-negative counts (train, val, test)"
    try:
        train, val, test = (int(v) for v in per_class)
    except (TypeError, ValueError):
        raise ConfigError(message) from None
    if min(train, val, test) < 0:
        raise ConfigError(message)
    return train, val, test


def write_dataset(
    name: str,
    root: str | os.PathLike[str],
    seed: int = 0,
    per_class: tuple[int, int, int] = DEFAULT_PER_CLASS,
    progress: bool = False,
    size: int = DEFAULT_SIZE,
) -> Path:
    """Render dataset ``name`` under ``root`` and return its folder ``<root>/<name>``.

    Idempotent: a complete dataset whose manifest matches (generator version, seed, sizes, style,
    classes) is left as is. Atomic: everything is written into a temporary sibling folder that is
    renamed into place, so a crash or a concurrent writer never leaves a half-written dataset. A
    stale dataset written by this function is replaced; a folder without a manifest is refused.
    """
    spec = get_dataset(name)
    per_class = _check_per_class(per_class)
    root = Path(root)
    target = root / spec.name
    manifest = _manifest(spec, seed, per_class, size)
    if _is_complete(target, spec, manifest):
        return target
    if target.exists() and not (target / MANIFEST).is_file():
        raise DataError(f"{target} exists but was not written by vladapt.synth (no {MANIFEST}); move it away")
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{spec.name}.", suffix=".tmp", dir=root))
    staging.chmod(0o755)  # mkdtemp makes it private; the installed dataset should not be
    try:
        _render_into(staging, spec, seed, per_class, size, progress)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        _swap_in(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not _is_complete(target, spec, manifest):
        raise DataError(f"{target} was written concurrently with a different seed, size or version")
    return target


def _swap_in(staging: Path, target: Path) -> None:
    """Move ``staging`` to ``target``, replacing a stale ``target``; losing a race is not an error."""
    retired = None
    if target.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
        try:
            target.replace(retired / target.name)
        except OSError:
            pass  # another writer moved it first
    try:
        staging.rename(target)
    except OSError:
        if not target.exists():
            raise
        # Another writer installed its copy first; the caller checks that it is the one we want.
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


def write_all(
    root: str | os.PathLike[str],
    seed: int = 0,
    per_class: tuple[int, int, int] = DEFAULT_PER_CLASS,
    progress: bool = False,
    size: int = DEFAULT_SIZE,
) -> dict[str, Path]:
    """:func:`write_dataset` for every registered dataset; returns ``{name: folder}``."""
    return {name: write_dataset(name, root, seed, per_class, progress, size) for name in DATASETS}


DEFAULT_FOLDER_CLASSES = ("red circle", "blue square", "green triangle", "yellow star")


def _parse_shape_color(name: str) -> tuple[str, str]:
    words = name.replace("_", " ").split()
    if len(words) != 2 or words[0] not in COLORS or words[1] not in SHAPES:
        raise ConfigError(
            f"class {name!r} is not '<color> <shape>' "
            f"with color in {list(COLORS)} and shape in {list(SHAPES)}"
        )
    return words[0], words[1]


def write_image_folder(
    out_dir: str | os.PathLike[str],
    classes: Iterable[str] | None = None,
    per_class: int = 8,
    seed: int = 0,
    style: Style = CLEAN,
    size: int = DEFAULT_SIZE,
) -> list[str]:
    """Write a plain image folder ``<out_dir>/<class_folder>/<i>.png`` and return the sorted folder names.

    ``classes`` are "<color> <shape>" names (spaces or underscores, e.g. ``"red_circle"``); default
    :data:`DEFAULT_FOLDER_CLASSES`. Images are clean by default, matching what a model pretrained on
    the world knows. Existing files of the same names are overwritten.
    """
    parsed = [_parse_shape_color(c) for c in classes or DEFAULT_FOLDER_CLASSES]
    out_dir = Path(out_dir)
    folders = []
    for color, shape in parsed:
        folder = class_folder(f"{color} {shape}")
        folders.append(folder)
        (out_dir / folder).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            rng = np.random.default_rng([seed, _stable_key(folder), i])
            image = render(sample_scene(rng, color=color, shape=shape), style, rng, size)
            _save_png(image, out_dir / folder / f"{i:03d}.png")
    return sorted(set(folders))
