"""Frozen-backbone image features of a run's splits, computed on demand and kept for the run.

This is the :class:`~vladapt.methods.base.FeatureSource` the protocols hand to
:meth:`Method.prepare`: training-free and cache methods (Tip-Adapter's keys, a linear probe's
inputs, class prototypes) read their features here instead of running the backbone themselves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from vladapt.data import DatasetSplits


class FrozenFeatures:
    """``image_features(split, augment_passes)`` of ``splits`` through the frozen ``backbone``.

    ``augment_passes = 0``: the test transform, one feature per image. ``augment_passes = n``: the
    mean of ``n`` training augmentations per image, each seeded by (seed, pass, image index), then
    L2-normalized (Tip-Adapter builds its cache keys so). Results are cached per (split, passes).
    """

    def __init__(self, backbone, splits: DatasetSplits, device: str | torch.device = "cpu", batch_size: int = 64,
                 seed: int = 0, progress: bool = False, workers: int = 0) -> None:
        self.backbone, self.splits, self.device = backbone, splits, device
        self.batch_size, self.seed, self.progress, self.workers = batch_size, seed, progress, workers
        self._cache: dict[tuple[str, int], tuple[Tensor, Tensor]] = {}

    @torch.no_grad()
    def _encode(self, dataset, desc: str) -> Tensor:
        loader = DataLoader(dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.workers)
        feats = [self.backbone.model.encode_image(images.to(self.device)).float()
                 for images, _ in tqdm(loader, desc=desc, disable=not self.progress, leave=False)]
        return torch.cat(feats).cpu()

    def image_features(self, split: str = "train", augment_passes: int = 0) -> tuple[Tensor, Tensor]:
        key = (split, augment_passes)
        if key not in self._cache:
            from vladapt.data import ImageDataset
            from vladapt.engine.train import _SeededAugmentation

            items = list(getattr(self.splits, split))
            labels = torch.tensor([d.label for d in items], dtype=torch.long)
            if augment_passes == 0:
                feats = self._encode(ImageDataset(items, self.splits.image_root, self.backbone.test_transform),
                                     f"features {split}")
            else:
                aug = _SeededAugmentation(items, self.splits.image_root, self.backbone.train_transform, self.seed)
                feats = sum(self._encode(_Pass(aug, p), f"features {split} pass {p + 1}/{augment_passes}")
                            for p in range(augment_passes)) / augment_passes
            self._cache[key] = (F.normalize(feats, dim=-1), labels)
        return self._cache[key]


class _Pass(torch.utils.data.Dataset):
    """One augmentation pass (its index plays the epoch's role in the seeding)."""

    def __init__(self, aug, index: int) -> None:
        self.aug, self.index = aug, index

    def __len__(self) -> int:
        return len(self.aug)

    def __getitem__(self, i: int):
        return self.aug[(self.index, i)]
