"""Frozen CLIP backbones with insertion points for trainable modules."""

from vladapt.backbones.loader import (
    TINY_CONFIGS,
    Backbone,
    Tokenizer,
    available_backbones,
    load_clip,
    read_checkpoint,
    weights_fingerprint,
)
from vladapt.backbones.model import CLIPConfig, CLIPModel, TextConfig, VisionConfig
from vladapt.backbones.points import (
    LINEAR_POINT_KINDS,
    POINT_KINDS,
    TOWERS,
    ForwardContext,
    InsertionPoint,
    ScaledResidual,
    TokenLayout,
    forward_scale,
    grad_scale,
    scaled_add,
    split_prefix,
)
from vladapt.backbones.transforms import CLIP_MEAN, CLIP_STD, test_transform, train_transform

__all__ = [
    "CLIP_MEAN", "CLIP_STD", "LINEAR_POINT_KINDS", "POINT_KINDS", "TINY_CONFIGS", "TOWERS", "Backbone",
    "CLIPConfig", "CLIPModel", "ForwardContext", "InsertionPoint", "ScaledResidual", "TextConfig", "TokenLayout",
    "Tokenizer", "VisionConfig", "available_backbones", "forward_scale", "grad_scale", "load_clip",
    "read_checkpoint", "scaled_add", "split_prefix", "test_transform", "train_transform", "weights_fingerprint",
]
