"""CLIP-Adapter: the released formula on raw features, parameter count, zero ratio = zero-shot CLIP."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vladapt.methods import create_method
from vladapt.methods.base import StepInfo

NAMES = ["cat", "dog", "red star", "blue ring"]


def test_vit_b16_parameter_count(vit_b16):
    m = create_method("clip_adapter", vit_b16, ["a", "b"])
    assert m.num_trainable_parameters() == 2 * 512 * 128 == 131_072
    assert m.feature_level and all(not p.requires_grad for p in vit_b16.model.parameters())


def test_logits_and_loss_equal_the_released_formula_on_raw_features(tiny, images):
    torch.manual_seed(0)
    m = create_method("clip_adapter", tiny, NAMES, {"templates": "a photo of a {}.", "label_smoothing": 0.1})
    with torch.no_grad():
        m.adapter.fc2.weight.mul_(5.0)  # make the adapter's share visible
        raw = tiny.model.encode_image(images).float()
        text = tiny.model.encode_text(tiny.tokenizer([f"a photo of a {c}." for c in NAMES])).float()
        w1, w2 = m.adapter.fc1.weight, m.adapter.fc2.weight
        x = F.relu(F.relu(raw @ w1.t()) @ w2.t())  # the released code: the adapter on the raw feature
        f = 0.2 * x + 0.8 * raw
        expected = tiny.model.logit_scale.exp() * F.normalize(f, dim=-1) @ F.normalize(text, dim=-1).t()
        m.eval()
        torch.testing.assert_close(m(images), expected, rtol=1e-5, atol=1e-4)
    labels = torch.tensor([0, 3, 2])
    out = m.training_step(images, labels, StepInfo.single(labels))
    torch.testing.assert_close(out.logits.detach(), expected, rtol=1e-5, atol=1e-4)
    assert float(out.loss.detach()) == pytest.approx(float(F.cross_entropy(expected, labels, label_smoothing=0.1)),
                                                     rel=1e-5)
    out.loss.backward()
    assert m.adapter.fc1.weight.grad.abs().sum() > 0 and m.adapter.fc2.weight.grad.abs().sum() > 0


def test_zero_ratio_is_zero_shot_clip_and_new_classes_need_only_names(tiny, images):
    m = create_method("clip_adapter", tiny, NAMES, {"ratio": 0.0}).eval()
    m.set_classnames(["yellow moon", "bird"], split="new")
    zs = create_method("zeroshot", tiny, ["yellow moon", "bird"])
    with torch.no_grad():
        torch.testing.assert_close(m(images), zs(images), rtol=1e-5, atol=1e-5)
