"""Image transforms of the CoOp/Dassl protocol, sized for a backbone.

Train: RandomResizedCrop(size, scale 0.08-1, bicubic) -> horizontal flip -> tensor -> CLIP normalization.
Test: resize the shorter side to ``size`` (bicubic) -> center crop -> tensor -> CLIP normalization.
"""

from __future__ import annotations

from typing import Sequence

from PIL import Image
from torchvision import transforms as T

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


class ToRGB:
    """Converts grayscale, palette and RGBA images to RGB (a picklable class, for loader workers)."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == "RGB" else img.convert("RGB")

    def __repr__(self) -> str:
        return "ToRGB()"


# Area range of the training crop in the field's protocol (Dassl's INPUT.RRCROP_SCALE).
DEFAULT_CROP_SCALE: tuple[float, float] = (0.08, 1.0)


def train_transform(size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                    scale: tuple[float, float] = DEFAULT_CROP_SCALE) -> T.Compose:
    return T.Compose([
        ToRGB(),
        T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def test_transform(size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> T.Compose:
    return T.Compose([
        ToRGB(),
        T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(size),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])
