"""Reference models for the backbone tests: open_clip's own CLIP with vladapt-test-tiny's architecture."""

from __future__ import annotations

import torch

TINY_VISION = dict(image_size=32, patch_size=8, width=128, layers=2, head_width=64)
TINY_TEXT = dict(context_length=77, vocab_size=49408, width=128, heads=2, layers=2)


def open_clip_tiny(seed: int = 0, quick_gelu: bool = True):
    """open_clip's own CLIP with the architecture of ``vladapt-test-tiny`` and seeded random weights."""
    from open_clip.model import CLIP

    torch.manual_seed(seed)
    model = CLIP(64, vision_cfg=dict(TINY_VISION), text_cfg=dict(TINY_TEXT), quick_gelu=quick_gelu).eval()
    with torch.no_grad():
        # open_clip leaves some tensors at constant init; randomize all so that any wiring error shows.
        for name, p in model.named_parameters():
            if name != "logit_scale":
                p.add_(0.02 * torch.randn_like(p))
    return model
