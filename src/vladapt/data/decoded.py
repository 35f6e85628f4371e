"""An on-disk cache of decoded, resized and center-cropped test images.

Evaluating a method decodes every test image (JPEG/PNG), resizes it (bicubic) and crops its center
again, for every seed, method and checkpoint; with a small backbone that is most of the evaluation
time. A deterministic transform splits into a PIL stage (``ToRGB``, ``Resize``, ``CenterCrop``) and a
tensor stage (``ToTensor``, ``Normalize``): this cache runs the PIL stage once per (image files, PIL
stage) and keeps its output, uint8 ``[N, H, W, 3]``, in a raw file read back with ``numpy.memmap``.
A reader slices a batch from the file and applies the tensor stage to the whole batch at once, with
the same arithmetic as ``ToTensor`` and ``Normalize``: the tensors are bit-identical to those of
``ImageDataset(items, root, transform)``.

An entry is two files in ``<root>/<key[:2]>/``: ``<key>.u8`` (the pixels) and ``<key>.json`` (a small
header: format version, key, the key's parts, N and the array shape). The key is the SHA-256 of the
image files' fingerprint (path, size and modification time of each, in order), the PIL stage's
description, N, the Pillow version and the format version: a changed image or transform gives another
key, so a stale entry is never read. Both files are written to a temporary file in the same folder, flushed to disk
and renamed into place, the header last; a reader checks the header and the exact size of the data
file, and an entry that does not match (torn, truncated, foreign) is rebuilt with a warning naming it.

A transform the cache cannot split (random crops and flips, unknown operations, an output size that
depends on the image) raises :class:`UnsupportedTransform`; :func:`evaluation_loader` then falls back
to decoding every image (with one warning), never to different pixels.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from vladapt.backbones.transforms import ToRGB
from vladapt.data import dataset as _dataset
from vladapt.data.base import Datum
from vladapt.data.workers import unwrapped
from vladapt.io import cache_key, files_fingerprint
from vladapt.errors import ConfigError, DataError
from vladapt.io import atomic_write_json

FORMAT = "vladapt-decoded-images"
VERSION = 1
DATA_SUFFIX = ".u8"
HEADER_SUFFIX = ".json"

# PIL operations the cache can run ahead of time: deterministic, the same for every call.
_PIL_OPS = (ToRGB, T.Resize, T.CenterCrop)


class UnsupportedTransform(ConfigError):
    """A transform the decoded-image cache cannot split into a cached PIL stage and a tensor stage."""


def image_cache_option(where: str | os.PathLike | None) -> Path | None:
    """The folder an ``--image-cache`` option names: not given, ``none`` or ``off`` -> no cache (``None``)."""
    if where is None:
        return None
    text = str(where).strip()
    return None if text.lower() in ("", "none", "off") else Path(text).expanduser()


# ---------------------------------------------------------------------------------------------------
# Splitting a transform


class PilStage:
    """The cached part of a transform: ``ToRGB`` / ``Resize`` / ``CenterCrop`` on an RGB PIL image,
    giving an image of the fixed size ``size = (height, width)``."""

    def __init__(self, ops: Sequence[Callable], size: tuple[int, int]) -> None:
        self.ops = list(ops)
        self.size = size

    def __call__(self, img: Image.Image) -> Image.Image:
        for op in self.ops:
            img = op(img)
        return img

    def __repr__(self) -> str:
        return "PilStage(" + ", ".join(repr(op) for op in self.ops) + ")"


class TensorStage:
    """The part applied at read time: ``ToTensor`` then any ``Normalize``, on a whole uint8 batch
    ``[B, H, W, 3]`` with the arithmetic of the single-image transforms (bit-identical results)."""

    def __init__(self, normalizers: Sequence[T.Normalize]) -> None:
        self.normalizers = list(normalizers)
        for norm in self.normalizers:
            if (torch.as_tensor(norm.std) == 0).any():
                raise UnsupportedTransform(f"{norm!r} divides by a zero std")

    def __call__(self, batch: Tensor) -> Tensor:
        # ToTensor: HWC -> CHW, contiguous, float32, / 255 (torchvision's to_tensor, per batch)
        x = batch.permute(0, 3, 1, 2).contiguous().to(dtype=torch.get_default_dtype()).div(255)
        for norm in self.normalizers:
            # torchvision's normalize: sub_(mean).div_(std) with [C, 1, 1] tensors of the input's dtype
            mean = torch.as_tensor(norm.mean, dtype=x.dtype).view(-1, 1, 1)
            std = torch.as_tensor(norm.std, dtype=x.dtype).view(-1, 1, 1)
            x.sub_(mean).div_(std)
        return x

    def __repr__(self) -> str:
        return "TensorStage(ToTensor()" + "".join(f", {n!r}" for n in self.normalizers) + ")"


def _hw(size: Any) -> tuple[int, int] | None:
    """(h, w) of a torchvision size argument that fixes both sides, else None."""
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return int(size[0]), int(size[1])
    return None


def split_transform(transform: Callable) -> tuple[PilStage, TensorStage]:
    """Split a deterministic ``T.Compose`` into its PIL stage and its tensor stage.

    Accepted: ``ToRGB``, ``Resize`` and ``CenterCrop`` (the PIL stage, ending in a fixed output size),
    then ``ToTensor``, then any number of ``Normalize``. Anything else raises :class:`UnsupportedTransform`
    naming the operation."""
    ops = list(transform.transforms) if isinstance(transform, T.Compose) else [transform]
    pil: list[Callable] = []
    normalizers: list[T.Normalize] = []
    size: tuple[int, int] | None = None
    seen_tensor = False
    for op in ops:
        name = type(op).__name__
        if not seen_tensor and type(op) in _PIL_OPS:  # exact types: a subclass may behave differently
            pil.append(op)
            if isinstance(op, T.CenterCrop):
                size = _hw(op.size) or (int(op.size[0]),) * 2
            elif isinstance(op, T.Resize):
                size = _hw(op.size)  # an int size keeps the aspect ratio: the output size depends on the image
            continue
        if not seen_tensor and type(op) is T.ToTensor:
            seen_tensor = True
            continue
        if seen_tensor and type(op) is T.Normalize:
            normalizers.append(op)
            continue
        random = name.startswith("Random") or name in ("ColorJitter", "AutoAugment", "RandAugment", "TrivialAugmentWide",
                                                       "AugMix", "GaussianBlur", "ElasticTransform")
        kind = "a random operation, different on every call" if random else "an operation the cache does not know"
        raise UnsupportedTransform(
            f"the decoded-image cache cannot cache the transform step {op!r}: {kind}. It caches deterministic "
            "test transforms only (ToRGB, Resize, CenterCrop, then ToTensor and Normalize); evaluate without "
            "--image-cache (or image_cache=None) for this transform")
    if not seen_tensor:
        raise UnsupportedTransform(f"the decoded-image cache needs a transform ending in ToTensor (and Normalize); "
                                   f"{transform!r} has none; evaluate without --image-cache for this transform")
    if size is None:
        raise UnsupportedTransform(f"the decoded-image cache needs a fixed image size (a CenterCrop or a Resize to "
                                   f"(height, width)) in {transform!r}; evaluate without --image-cache for it")
    return PilStage(pil, size), TensorStage(normalizers)


# ---------------------------------------------------------------------------------------------------
# Entries


def entry_parts(items: Sequence[Datum], image_root: Path, pil: PilStage) -> dict[str, Any]:
    """What an entry's key is the hash of."""
    return {"format": FORMAT, "version": VERSION, "pil_stage": repr(pil), "n": len(items),
            "pillow": PIL.__version__,  # its resampling code has changed pixels between releases
            "files": files_fingerprint(Path(image_root) / d.path for d in items)}


def entry_paths(root: Path, key: str) -> tuple[Path, Path]:
    """(data file, header file) of the entry ``key`` under ``root``."""
    folder = Path(root) / key[:2]
    return folder / f"{key}{DATA_SUFFIX}", folder / f"{key}{HEADER_SUFFIX}"


class _PilImages(Dataset):
    """The PIL stage's output of each item as uint8 ``[H, W, 3]`` (for the build's loader workers)."""

    def __init__(self, items: Sequence[Datum], image_root: Path, pil: PilStage) -> None:
        self.items, self.image_root, self.pil = list(items), Path(image_root), pil

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> np.ndarray:
        path = self.image_root / self.items[index].path
        img = self.pil(_dataset.load_image(path))
        arr = np.array(img, dtype=np.uint8, copy=True)  # as ToTensor reads it (writable)
        if arr.shape != (*self.pil.size, 3):
            raise DataError(f"image {path} gives a {arr.shape} array through {self.pil!r}, expected "
                                     f"{(*self.pil.size, 3)}; evaluate without --image-cache for this transform")
        return arr


def _read(data: Path, header: Path, key: str, shape: tuple[int, ...]) -> np.memmap | None:
    """The entry's pixels, or None when it is absent or does not match (then with a warning)."""
    if not header.is_file():
        if data.exists():
            warnings.warn(f"decoded-image cache entry {data} has no header (an interrupted write); rebuilding it",
                          stacklevel=3)
        return None
    try:
        meta = json.loads(header.read_text(encoding="utf-8"))
        expected = {"format": FORMAT, "version": VERSION, "key": key, "shape": list(shape), "dtype": "uint8"}
        wrong = [k for k, v in expected.items() if not isinstance(meta, dict) or meta.get(k) != v]
        if wrong:
            raise ValueError(f"its header does not match ({', '.join(wrong)})")
        size, want = data.stat().st_size, math.prod(shape)
        if size != want:
            raise ValueError(f"{data.name} holds {size} bytes, expected {want}")
        if want == 0:
            return np.zeros(shape, np.uint8)
        return np.memmap(data, dtype=np.uint8, mode="c", shape=shape)
    except (OSError, ValueError) as err:  # torn, truncated, foreign or unreadable: rebuild it
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        warnings.warn(f"decoded-image cache entry {header} is unusable ({reason}); rebuilding it", stacklevel=3)
        return None


def _build(data: Path, header: Path, key: str, parts: dict[str, Any], dataset: _PilImages, shape: tuple[int, ...],
           workers: int, progress: bool, desc: str) -> np.memmap:
    from tqdm.auto import tqdm

    header.unlink(missing_ok=True)  # a valid header only ever describes a complete data file
    data.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{data.name}.", suffix=".tmp", dir=data.parent)
    try:
        os.fchmod(fd, 0o644)
        os.close(fd)
        if shape[0] > 0:
            out = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=shape)
            loader = DataLoader(dataset, batch_size=32, shuffle=False, num_workers=workers)
            start = 0
            with tqdm(total=shape[0], desc=f"{desc} (decoding once)", disable=not progress, leave=False,
                      unit="img") as bar:
                for batch in unwrapped(loader):
                    out[start:start + len(batch)] = batch.numpy()
                    start += len(batch)
                    bar.update(len(batch))
            out.flush()
            del out
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, data)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    atomic_write_json(header, {"format": FORMAT, "version": VERSION, "key": key, "shape": list(shape),
                               "dtype": "uint8", "parts": parts})
    return np.memmap(data, dtype=np.uint8, mode="c", shape=shape) if shape[0] else np.zeros(shape, np.uint8)


@dataclass
class DecodedImages:
    """A test split through a transform's PIL stage, read from the cache: ``batch(start, stop)`` gives
    the transformed images ``[B, 3, H, W]`` of items ``start:stop``."""

    array: np.ndarray  # uint8 [N, H, W, 3], memory-mapped
    labels: Tensor  # long [N]
    tensor_stage: TensorStage
    path: Path
    built: bool  # True when this call decoded the images (a miss), False on a hit

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, start: int, stop: int) -> Tensor:
        return self.tensor_stage(torch.from_numpy(self.array[start:stop]))

    def loader(self, batch_size: int, pin_memory: bool = False) -> DecodedLoader:
        return DecodedLoader(self, batch_size, pin_memory)


class DecodedLoader:
    """Batches ``(images, labels)`` of a :class:`DecodedImages` in order (an evaluation loader)."""

    def __init__(self, images: DecodedImages, batch_size: int, pin_memory: bool = False) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {batch_size}")
        self.images, self.batch_size, self.pin_memory = images, batch_size, pin_memory

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for start in range(0, len(self.images), self.batch_size):
            stop = min(start + self.batch_size, len(self.images))
            x, y = self.images.batch(start, stop), self.images.labels[start:stop]
            if self.pin_memory:
                x, y = x.pin_memory(), y.pin_memory()
            yield x, y


def decoded_images(items: Sequence[Datum], image_root: str | os.PathLike, transform: Callable,
                   cache_dir: str | os.PathLike, workers: int = 0, progress: bool = True,
                   desc: str = "images") -> DecodedImages:
    """``items`` through ``transform``'s PIL stage, from the cache in ``cache_dir`` (built on a miss).

    Raises :class:`UnsupportedTransform` when ``transform`` cannot be split (see :func:`split_transform`),
    a :class:`~vladapt.errors.DataError` for a missing or unreadable image, and an ``OSError`` when the
    cache folder cannot be written."""
    pil, tensor_stage = split_transform(transform)
    image_root = Path(image_root)
    parts = entry_parts(items, image_root, pil)
    key = cache_key(parts)
    data, header = entry_paths(Path(cache_dir), key)
    shape = (len(items), *pil.size, 3)
    labels = torch.tensor([d.label for d in items], dtype=torch.long)
    array = _read(data, header, key, shape)
    built = array is None
    if array is None:
        array = _build(data, header, key, parts, _PilImages(items, image_root, pil), shape, workers, progress, desc)
    return DecodedImages(array, labels, tensor_stage, data, built)


_warned: set[str] = set()


def evaluation_loader(items: Sequence[Datum], image_root: str | os.PathLike, transform: Callable,
                      cache_dir: str | os.PathLike, batch_size: int, device: str | torch.device = "cpu",
                      workers: int = 0, progress: bool = True, desc: str = "images") -> DecodedLoader | None:
    """An evaluation loader over the cached images, or ``None`` (after one warning per reason) when
    the cache cannot serve ``transform`` or cannot be written: the caller then decodes the images."""
    try:
        images = decoded_images(items, image_root, transform, cache_dir, workers, progress, desc)
    except (UnsupportedTransform, OSError) as err:
        reason = str(err) if isinstance(err, UnsupportedTransform) else \
            f"cannot write the decoded-image cache in {cache_dir} ({err.strerror or err}); make it writable or " \
            "pass --image-cache none"
        if reason not in _warned:
            _warned.add(reason)
            warnings.warn(f"{reason}; decoding the images instead", stacklevel=2)
        return None
    return images.loader(batch_size, pin_memory=torch.device(device).type == "cuda")
