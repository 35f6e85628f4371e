"""CLIP-LoRA: parameter count, identity at initialisation, the LoRA identity W + s·BA against a copy of
the backbone with merged weights, dropout, checkpoints and config errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from vladapt.errors import ConfigError
from vladapt.methods import create_method
from vladapt.methods.base import StepInfo
from vladapt.methods.clip_lora import LoRADelta

NAMES = ["cat", "dog", "red star", "blue ring", "green cross"]


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(3)
    return torch.randn(4, 3, 32, 32, generator=g), torch.tensor([0, 2, 2, 4])


def randomize(m, seed=0, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in m.lora.values():
            mod.lora_A.copy_(torch.randn(mod.lora_A.shape, generator=g) * std)
            mod.lora_B.copy_(torch.randn(mod.lora_B.shape, generator=g) * std)


def merged_model(m, scaling):
    """A deep copy of the backbone's model with ``scaling * B @ A`` added to the q/k/v (and out)
    weights of every block that has LoRA: the defining identity of LoRA, computed from the weights."""
    model = copy.deepcopy(m.clip)
    towers = {"visual": model.visual.transformer.resblocks, "text": model.transformer.resblocks}
    offsets = {"attn_q": 0, "attn_k": 1, "attn_v": 2}
    with torch.no_grad():
        for key, mod in m.lora.items():
            tower, _, layer, *kind = key.split("_")
            kind = "_".join(kind)
            attn = towers[tower][int(layer)].attn
            delta = scaling * mod.lora_B @ mod.lora_A
            if kind == "attn_out":
                attn.out_proj.weight += delta
            else:
                d = attn.in_proj_weight.shape[1]
                attn.in_proj_weight[offsets[kind] * d:(offsets[kind] + 1) * d] += delta
    assert model.attached_modules() == {}
    return model


def reference_logits(model, images, tokens, scale):
    image = F.normalize(model.encode_image(images).float(), dim=-1)
    text = F.normalize(model.encode_text(tokens).float(), dim=-1)
    return scale * image @ text.t()


def test_vit_b16_parameter_count(vit_b16):
    m = create_method("clip_lora", vit_b16, ["a", "b"])
    n = 12 * 3 * 2 * (512 + 512) + 12 * 3 * 2 * (768 + 768)
    assert n == 184_320 and m.num_trainable_parameters() == 184_320  # METHODS.md §4.10
    assert len(m.lora) == 72 and sorted({k.split("_", 3)[3] for k in m.lora}) == ["attn_k", "attn_q", "attn_v"]
    assert m.scaling == pytest.approx(1 / math.sqrt(2))  # the reference loralib: alpha / sqrt(r)
    assert all(not p.requires_grad for p in vit_b16.model.parameters()) and vit_b16.model.attached_modules() == {}


def test_initialisation_is_kaiming_uniform_A_and_zero_B(tiny):
    torch.manual_seed(0)
    m = create_method("clip_lora", tiny, NAMES)
    for mod in m.lora.values():
        assert torch.all(mod.lora_B == 0)
        bound = 1 / math.sqrt(mod.point.in_width)  # kaiming_uniform(a=sqrt(5)) on [r, d_in]
        assert mod.lora_A.abs().max() <= bound and mod.lora_A.abs().max() > 0.5 * bound
        assert mod.lora_A.shape == (2, mod.point.in_width) and mod.lora_B.shape == (mod.point.width, 2)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_initial_model_is_zero_shot_clip_with_the_dataset_template(tiny, batch, mode):
    images, labels = batch
    m = create_method("clip_lora", tiny, NAMES, {"logit_scale": None, "template": "dataset"})
    m.set_classnames(NAMES, dataset="dtd", split="all")
    assert m.template == "{} texture."
    assert create_method("clip_lora", tiny, NAMES).template == "a photo of a {}."  # the released code's, any dataset
    zs = create_method("zeroshot", tiny, NAMES, {"templates": "dataset", "dataset": "dtd"})
    with torch.no_grad():
        expected = zs(images)
        if mode == "eval":
            m.eval()
            got = m(images)
        else:  # dropout on the LoRA input cannot change anything while B = 0
            m.train()
            got = m.training_step(images, labels, StepInfo.single(labels, seed=5)).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("cfg", [{"dropout": 0.0}, {"scaling": "alpha_over_r", "dropout": 0.0, "rank": 3, "alpha": 2.0},
                                 {"targets": ["q", "v", "o"], "dropout": 0.0, "layer_start": 2}])
def test_training_step_equals_the_merged_weights_model(tiny, batch, cfg):
    images, labels = batch
    torch.manual_seed(0)
    m = create_method("clip_lora", tiny, NAMES, {"template": "dataset", **cfg})
    m.set_classnames(NAMES, dataset="oxford_pets", split="train")
    randomize(m)
    m.train()
    out = m.training_step(images, labels, StepInfo.single(labels))
    # their --params names: q, k, v -> the fused in-projection's slices, o -> the output projection
    points = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_out"}
    assert {k.split("_", 3)[3] for k in m.lora} == {points[t] for t in cfg.get("targets", ["q", "k", "v"])}
    r, alpha = cfg.get("rank", 2), cfg.get("alpha", 1.0)
    scaling = alpha / (r if cfg.get("scaling") == "alpha_over_r" else math.sqrt(r))
    assert m.scaling == pytest.approx(scaling)
    tokens = tiny.tokenizer([f"a photo of a {c}, a type of pet." for c in NAMES])
    with torch.no_grad():
        expected = reference_logits(merged_model(m, scaling), images, tokens, 100.0)
        frozen = reference_logits(tiny.model, images, tokens, 100.0)
    assert (expected - frozen).abs().max() > 0.1  # the LoRA weights do change the model
    torch.testing.assert_close(out.logits, expected, rtol=0, atol=2e-4)
    torch.testing.assert_close(out.loss, F.cross_entropy(expected, labels), rtol=0, atol=1e-5)
    # both towers' LoRA matrices receive gradients; the backbone none
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.trainable_parameters())
    assert all(p.grad is None for p in tiny.model.parameters()) and tiny.model.attached_modules() == {}
    # evaluation (cached classifier, no dropout) gives the same function
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(images), expected, rtol=0, atol=2e-4)


def test_dropout_acts_in_training_only_and_follows_the_step_generator(tiny, batch):
    images, labels = batch
    m = create_method("clip_lora", tiny, NAMES, {"template": "dataset"})  # dropout 0.25
    m.set_classnames(NAMES, dataset="oxford_pets", split="train")
    randomize(m)
    tokens = tiny.tokenizer([f"a photo of a {c}, a type of pet." for c in NAMES])
    with torch.no_grad():
        expected = reference_logits(merged_model(m, m.scaling), images, tokens, 100.0)
        m.eval()
        evald = m.training_step(images, labels, StepInfo.single(labels, seed=1)).logits
        torch.testing.assert_close(evald, expected, rtol=0, atol=2e-4)
        m.train()
        a = m.training_step(images, labels, StepInfo.single(labels, seed=1)).logits
        torch.manual_seed(123)  # the global RNG plays no part
        b = m.training_step(images, labels, StepInfo.single(labels, seed=1)).logits
        c = m.training_step(images, labels, StepInfo.single(labels, seed=2)).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-3 and (a - expected).abs().max() > 1e-3


def test_lora_delta_is_inverted_dropout_on_the_input_then_BA(tiny):
    point = next(p for p in tiny.model.insertion_points("visual", layers=[0]) if p.kind == "attn_v")
    mod = LoRADelta(point, rank=2, scaling=0.5, dropout=0.25)
    with torch.no_grad():
        mod.lora_B.normal_()
    x = torch.randn(2, 5, point.in_width)
    g = torch.Generator().manual_seed(7)
    mod._source[0].generator = g
    got = mod(x)
    keep = torch.rand(x.shape, generator=torch.Generator().manual_seed(7)) >= 0.25
    torch.testing.assert_close(got, 0.5 * (x * keep / 0.75) @ (mod.lora_B @ mod.lora_A).t(), rtol=1e-5, atol=1e-6)
    mod.eval()
    torch.testing.assert_close(mod(x), 0.5 * x @ (mod.lora_B @ mod.lora_A).t(), rtol=1e-5, atol=1e-6)


def test_classifier_cache_follows_the_weights(tiny, batch):
    images, _ = batch
    m = create_method("clip_lora", tiny, NAMES)
    m.eval()
    w0 = m.text_classifier()
    assert m.text_classifier() is w0
    randomize(m)
    w1 = m.text_classifier()
    assert (w1 - w0).abs().max() > 1e-3
    m.set_classnames(NAMES[:3], dataset="dtd", split="new")
    assert m.text_classifier().shape[0] == 3 and m(images).shape == (4, 3)


def test_checkpoint_round_trip(tiny, batch):
    images, _ = batch
    m = create_method("clip_lora", tiny, NAMES)
    randomize(m, seed=4)
    state = m.checkpoint_state()
    assert len(state) == 2 * len(m.lora) == 2 * 3 * (2 + 2)  # A and B, q/k/v, the test model's 2 + 2 blocks
    assert all(k.startswith("lora.") for k in state)
    other = create_method("clip_lora", tiny, NAMES)
    other.load_checkpoint_state({k: v.clone() for k, v in state.items()})
    m.eval(), other.eval()
    with torch.no_grad():
        torch.testing.assert_close(other(images), m(images), rtol=0, atol=0)


def test_towers_subsets(tiny, batch):
    images, labels = batch
    full = create_method("clip_lora", tiny, NAMES).num_trainable_parameters()
    vis = create_method("clip_lora", tiny, NAMES, {"towers": ["visual"]})
    txt = create_method("clip_lora", tiny, NAMES, {"towers": ["text"]})
    assert vis.num_trainable_parameters() + txt.num_trainable_parameters() == full
    for m in (vis, txt):
        randomize(m)
        m.train()
        out = m.training_step(images, labels, StepInfo.single(labels))
        out.loss.backward()
        assert all(p.grad is not None for p in m.trainable_parameters())


@pytest.mark.parametrize("cfg", [{"rank": 0}, {"rank": -1}, {"targets": ["q", "x"]}, {"targets": ["qkv"]},
                                 {"targets": []}, {"towers": ["audio"]}, {"dropout": 1.0},
                                 {"scaling": "alpha"}, {"layer_start": 9}, {"template": "no placeholder"}])
def test_config_errors(tiny, cfg):
    with pytest.raises(ConfigError):
        create_method("clip_lora", tiny, NAMES, cfg)


def test_base2new_config_is_the_defaults_and_published_training():
    from dataclasses import asdict

    from vladapt.engine.runconfig import resolve_run_config
    from vladapt.methods.clip_lora import CLIPLoRAConfig

    method, train = resolve_run_config("clip_lora", "base2new", None, [])
    assert method == asdict(CLIPLoRAConfig())
    assert (train.optimizer, train.lr, train.weight_decay, list(train.betas), train.batch_size) == (
        "adamw", 2e-4, 1e-2, [0.9, 0.999], 32)
    assert (train.schedule, train.iterations, train.min_lr, list(train.crop_scale)) == (
        "iteration", 500 * 16, 1e-6, [0.08, 1.0])
