"""Frozen-backbone image features of a run's splits, computed once and kept (in memory and on disk).

This is the :class:`~vladapt.methods.base.FeatureSource` the protocols hand to
:meth:`Method.prepare`: training-free and cache methods (Tip-Adapter's keys, a linear probe's
inputs, class prototypes) read their features here instead of running the backbone themselves, and
the engine trains and evaluates feature-level methods (:attr:`Method.feature_level`) on them. Every
encoding goes through a :class:`~vladapt.engine.feature_cache.FeatureCache`, keyed by the backbone's
weights fingerprint and dtype, the image files, the transform and the augmentation pass and seed.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from vladapt.data import DatasetSplits, Datum, ImageDataset
from vladapt.engine.feature_cache import FeatureCache
from vladapt.io import files_fingerprint
from vladapt.data.workers import unwrapped


# Bumped when the image encoder's arithmetic changes (even in the last bits), so that cached features
# always equal what the current code computes.
ENCODER_VERSION = 2


class FrozenFeatures:
    """``image_features(split, augment_passes)`` of ``splits`` through the frozen ``backbone``.

    ``augment_passes = 0``: the test transform, one feature per image. ``augment_passes = n``: the
    mean of ``n`` training augmentations per image (pass ``p`` seeded by (seed, p, image index), the
    engine's augmentation of epoch ``p``), then L2-normalized (Tip-Adapter builds its cache keys so).
    ``cache``: where encodings are kept (default: in memory for this object only).
    """

    def __init__(self, backbone, splits: DatasetSplits, device: str | torch.device = "cpu", batch_size: int = 64,
                 seed: int = 0, progress: bool = False, workers: int = 0, cache: FeatureCache | None = None) -> None:
        self.backbone, self.splits, self.device = backbone, splits, device
        self.batch_size, self.seed, self.progress, self.workers = batch_size, seed, progress, workers
        self.cache = cache if cache is not None else FeatureCache()

    # ------------------------------------------------------------------ the one encoder
    @torch.no_grad()
    def _run(self, dataset: Dataset, desc: str) -> Tensor:
        loader = DataLoader(dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.workers)
        feats = [self.backbone.model.encode_image(images.to(self.device)).float()
                 for images, _ in tqdm(unwrapped(loader), desc=desc, total=len(loader), disable=not self.progress,
                                       leave=False)]
        return torch.cat(feats).cpu()

    def encode(self, items: list[Datum], image_root: Path, transform, desc: str, augment: tuple[int, int] | None = None
               ) -> Tensor:
        """The image encoder's fp32 outputs ``[N, E]`` (not normalized) for ``items`` through ``transform`` (cached).

        ``augment = (seed, pass)``: each image's transform is seeded by (seed, pass, index), exactly
        as the engine seeds the images of epoch ``pass``; ``None``: a deterministic transform."""
        from vladapt.engine.train import _SeededAugmentation

        image_root = Path(image_root)
        model = self.backbone.model
        parts = {"kind": "image_features", "backbone": self.backbone.fingerprint, "dtype": str(model.dtype),
                 "transform": repr(transform), "augment": list(augment) if augment else None,
                 "files": files_fingerprint(image_root / d.path for d in items), "n": len(items),
                 # the encoder's computation: 2 = the last block computes the CLS token alone (other last bits)
                 "encoder": ENCODER_VERSION}

        def compute() -> Tensor:
            if augment is None:
                return self._run(ImageDataset(items, image_root, transform), desc)
            seed, index = augment
            return self._run(_Pass(_SeededAugmentation(items, image_root, transform, seed), index), desc)

        return self.cache.get(parts, compute)

    # ------------------------------------------------------------------ FeatureSource
    def image_features(self, split: str = "train", augment_passes: int = 0, normalize: bool = True,
                       crop_scale: tuple[float, float] | None = None) -> tuple[Tensor, Tensor]:
        from vladapt.backbones import train_transform

        items = list(getattr(self.splits, split))
        labels = torch.tensor([d.label for d in items], dtype=torch.long)
        root = self.splits.image_root
        if augment_passes == 0:
            feats = self.encode(items, root, self.backbone.test_transform, f"features {split}")
        else:
            bb = self.backbone
            transform = (bb.train_transform if crop_scale is None
                         else train_transform(bb.image_size, bb.mean, bb.std, scale=tuple(crop_scale)))
            feats = sum(self.encode(items, root, transform,
                                    f"features {split} pass {p + 1}/{augment_passes}", (self.seed, p))
                        for p in range(augment_passes)) / augment_passes
        return (F.normalize(feats, dim=-1) if normalize else feats), labels

    def test_features(self, splits: DatasetSplits) -> Tensor:
        """L2-normalized test-transform features of ``splits.test`` (any dataset: the protocols' evaluation sets)."""
        return F.normalize(self.encode(list(splits.test), splits.image_root, self.backbone.test_transform,
                                       f"features {splits.name} test"), dim=-1)

    def train_pass(self, items: list[Datum], image_root: Path, transform, seed: int, epoch: int) -> Tensor:
        """L2-normalized features of the engine's augmentation of epoch ``epoch`` (seed ``seed``)."""
        return F.normalize(self.encode(items, image_root, transform, f"features epoch {epoch + 1}", (seed, epoch)),
                           dim=-1)


class _Pass(torch.utils.data.Dataset):
    """One augmentation pass (its index plays the epoch's role in the seeding)."""

    def __init__(self, aug, index: int) -> None:
        self.aug, self.index = aug, index

    def __len__(self) -> int:
        return len(self.aug)

    def __getitem__(self, i: int):
        return self.aug[(self.index, i)]
