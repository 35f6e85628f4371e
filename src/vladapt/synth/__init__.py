"""vladapt.synth: the synthetic image-text world that lets the whole pipeline run offline on a CPU.

- :mod:`~vladapt.synth.scene`: the attribute space (shape, colour, size, count, background, position).
- :mod:`~vladapt.synth.render`: drawing a scene in a :class:`Style` (clean or a domain shift).
- :mod:`~vladapt.synth.captions`: true natural-English captions of a scene.
- :mod:`~vladapt.synth.world`: the deterministic (image, caption) stream for pretraining.
- :mod:`~vladapt.synth.datasets`: downstream classification datasets in the CoOp split layout.
- :mod:`~vladapt.synth.descriptions`: CuPL-style description banks for those datasets.
"""

from __future__ import annotations

from vladapt.synth.datasets import DATASETS, write_all, write_dataset, write_image_folder
from vladapt.synth.render import CLEAN, Style, render, shifted
from vladapt.synth.scene import Scene, sample_scene
from vladapt.synth.world import caption, pretrain_style_mix, sample, sample_batch

__all__ = [
    "CLEAN",
    "DATASETS",
    "Scene",
    "Style",
    "caption",
    "pretrain_style_mix",
    "render",
    "sample",
    "sample_batch",
    "sample_scene",
    "shifted",
    "write_all",
    "write_dataset",
    "write_image_folder",
]
