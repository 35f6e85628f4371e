"""Torch dataset over a list of :class:`~vladapt.data.base.Datum`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms.functional import to_tensor

from vladapt.data.base import Datum
from vladapt.errors import DataError

#: How to run the checker, for messages that can reach a CLI user or a Python caller.
CHECK_HINT = "`vladapt data check --dataset NAME --root ROOT` (Python: vladapt.data.check_dataset())"


def load_image(path: Path) -> Image.Image:
    """Open ``path`` as an RGB image; a missing or unreadable file raises :class:`DataError`."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"image {path} not found; {CHECK_HINT} lists every missing file") from None
    except (OSError, SyntaxError, ValueError) as err:
        # PIL reports corrupt files as OSError (UnidentifiedImageError) and, for some formats, SyntaxError.
        raise DataError(
            f"cannot read image {path}: {err}; {CHECK_HINT} lists every unreadable file"
        ) from err


class ImageDataset(Dataset):
    """``(image, label)`` pairs read from ``image_root / datum.path``.

    ``transform`` maps an RGB PIL image to a tensor (e.g. a CLIP pre-processing pipeline, ``[3, H, W]``);
    without one the image becomes a float tensor ``[3, H, W]`` in [0, 1].
    """

    def __init__(
        self,
        items: Sequence[Datum],
        image_root: Path,
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
    ) -> None:
        self.items = list(items)
        self.image_root = Path(image_root)
        self.transform = transform if transform is not None else to_tensor

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        datum = self.items[index]
        return self.transform(load_image(self.image_root / datum.path)), datum.label
