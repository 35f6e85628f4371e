"""Tip-Adapter and Tip-Adapter-F: logits against an independent float64 formula, the alpha/beta search
(validation only, equal to a brute-force search), trainable keys, unseen classes, checkpoints."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

from vladapt.config import from_mapping
from vladapt.engine.checkpoint import load_checkpoint, save_checkpoint
from vladapt.engine.train import TrainConfig, build_optimizer
from vladapt.errors import ConfigError
from vladapt.methods import create_method
from vladapt.methods.base import StepInfo
from vladapt.methods.tip_adapter import TipAdapterConfig, search_alpha_beta

NAMES = ["cat", "dog", "red star", "blue ring"]
SMALL_GRID = {"search_step": [40, 12]}  # the reference's [200, 20] is the default; smaller keeps tests fast


class Splits:
    """What prepare reads of a DatasetSplits: class names and (the length of) the val split."""

    def __init__(self, names, n_val=1, name="caltech101"):
        self.classnames, self.val, self.name = list(names), [None] * n_val, name


class Features:
    """A FeatureSource over fixed tensors; the test split raises, and every request is recorded."""

    def __init__(self, dim, n_classes=len(NAMES), shots=3, n_val=5, seed=0, val=None):
        g = torch.Generator().manual_seed(seed)
        labels = torch.arange(n_classes).repeat_interleave(shots)
        self.train = (F.normalize(torch.randn(len(labels), dim, generator=g), dim=-1), labels)
        if val is None:
            vl = torch.arange(n_classes).repeat(n_val)
            # near the keys of their class, so the cache matters and the accuracy varies over the grid
            keys = self.train[0][vl * shots]
            val = (F.normalize(keys + 0.8 * torch.randn(len(vl), dim, generator=g), dim=-1), vl)
        self.val = val
        self.requests = []

    def image_features(self, split="train", augment_passes=0, crop_scale=None):
        self.requests.append((split, augment_passes, crop_scale))
        if split == "train":
            return self.train
        if split == "val":
            return self.val
        raise AssertionError(f"the {split!r} split was touched")


def prepared(tiny, name="tip_adapter", config=None, features=None, names=NAMES, dataset="caltech101"):
    cfg = {**SMALL_GRID, **(config or {})}
    m = create_method(name, tiny, names, cfg)
    m.set_classnames(names, dataset=dataset, split="train")
    features = features or Features(tiny.model.text_projection.shape[1], len(names))
    m.prepare(Splits(names), features)
    return m, features


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))


# ----------------------------------------------------------------------------- independent maths
def text_weights64(tiny, names, templates):
    clip = tiny.model
    with torch.no_grad():
        per_template = [F.normalize(clip.encode_text(tiny.tokenizer([t.format(n) for n in names])).double(), dim=-1)
                        for t in templates]
    return F.normalize(torch.stack(per_template).mean(0), dim=-1)


def tip_logits64(f, w, keys, labels, n_classes, alpha, beta, scale=100.0):
    f, keys = f.double(), keys.double()
    values = torch.zeros(len(labels), n_classes, dtype=torch.float64)
    values[torch.arange(len(labels)), labels] = 1.0
    return scale * f @ w.t() + alpha * torch.exp(-beta * (1.0 - f @ keys.t())) @ values


def image_features64(tiny, images):
    with torch.no_grad():
        return F.normalize(tiny.model.encode_image(images).double(), dim=-1)


def brute_force(f, y, keys, labels, n_classes, w, scale, steps):
    """Every grid point in float64; the first best (beta-major) wins."""
    best = None
    for i in range(steps[0]):
        beta = 0.1 + i * (scale[0] - 0.1) / steps[0]
        for j in range(steps[1]):
            alpha = 0.1 + j * (scale[1] - 0.1) / steps[1]
            acc = int((tip_logits64(f, w, keys, labels, n_classes, alpha, beta).argmax(-1) == y).sum())
            if best is None or acc > best[0]:
                best = (acc, beta, alpha)
    return best


# ----------------------------------------------------------------------------- tests
def test_logits_equal_the_formula(tiny, images):
    m, feats = prepared(tiny)
    m.eval()
    keys, labels = feats.train
    w = text_weights64(tiny, NAMES, ["a photo of a {}."])  # CoOp's (and the reference's) caltech101 template
    expected = tip_logits64(image_features64(tiny, images), w, keys, labels, len(NAMES), float(m.alpha), float(m.beta))
    with torch.no_grad():
        assert torch.allclose(m(images).double(), expected, atol=1e-4, rtol=1e-5)
    # the reference's ImageNet classifier: CLIP's 7 templates; the cache term is the only other one
    m.set_classnames(NAMES, dataset="imagenet", split="all")
    templates = ["itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
                 "a {} in a video game.", "art of the {}.", "a photo of the small {}."]
    assert sorted(m.templates) == sorted(templates)
    w7 = text_weights64(tiny, NAMES, templates)
    m.alpha.fill_(2.5)
    m.beta.fill_(4.0)
    expected = tip_logits64(image_features64(tiny, images), w7, keys, labels, len(NAMES), 2.5, 4.0)
    with torch.no_grad():
        assert torch.allclose(m(images).double(), expected, atol=1e-4, rtol=1e-5)


def test_the_search_uses_validation_only_and_equals_brute_force(tiny):
    assert list(inspect.signature(search_alpha_beta).parameters)[:2] == ["val_features", "val_labels"]
    # alpha up to 60: large enough against the random text classifier's 100 * cos for the grid to matter
    m, feats = prepared(tiny, config={"search_scale": [12.0, 60.0]})
    assert {s for s, *_ in feats.requests} == {"train", "val"}  # the test split was never asked for
    assert ("train", 10, (0.5, 1.0)) in feats.requests  # the keys: 10 augmented passes, crops of 50-100%
    s = m.settings()
    assert s["search_scale"] == [12.0, 60.0] and (s["init_alpha"], s["init_beta"]) == (3.0, 1.0)  # caltech101
    keys, labels = feats.train
    vf, vl = feats.val
    w = text_weights64(tiny, NAMES, m.templates)
    acc, beta, alpha = brute_force(vf.double(), vl, keys, labels, len(NAMES), w, s["search_scale"], s["search_step"])
    assert (float(m.beta), float(m.alpha)) == pytest.approx((beta, alpha))
    assert m.last_search.correct == acc
    # the search matters here: its accuracy beats the initial values and zero-shot CLIP
    init = tip_logits64(vf, w, keys, labels, len(NAMES), 3.0, 1.0).argmax(-1).eq(vl).sum()
    zero_shot = (vf.double() @ w.t()).argmax(-1).eq(vl).sum()
    assert acc > max(int(init), int(zero_shot))


def test_grid_and_reference_defaults():
    cfg = from_mapping(TipAdapterConfig, {})
    assert (cfg.init_alpha, cfg.search_scale, cfg.search_step, cfg.augment_epoch, cfg.logit_scale) == (
        None, None, None, 10, 100.0)
    from vladapt.methods.tip_adapter import reference_settings, search_grid

    assert reference_settings("oxford_flowers")["search_scale"] == [50.0, 50.0]
    assert reference_settings("my_custom_data") == reference_settings("imagenet")
    assert reference_settings(None)["search_step"] == [200, 20]
    grid = search_grid(7, 200)
    assert len(grid) == 200 and grid[0] == 0.1 and grid[-1] == pytest.approx(0.1 + 199 * 6.9 / 200) and 7 not in grid


def test_the_first_best_grid_point_wins():
    # every grid point gives the same predictions (no cache entry is similar): the first pair is kept
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    res = search_alpha_beta(f, torch.tensor([0, 1]), torch.tensor([[-1.0, 0.0]]), torch.tensor([[1.0, 0.0]]),
                            torch.eye(2), [5.0, 3.0], [4, 3])
    assert (res.beta, res.alpha, res.correct) == (0.1, 0.1, 2)
    # beta is the outer loop: with an affinity above 1 (trained keys) the cache term grows with beta, so
    # (beta 0.1, alpha 1.09) and (beta 5.05, alpha 0.1) both classify the sample; beta-major finds the first
    res = search_alpha_beta(torch.tensor([[1.0, 0.0]]), torch.tensor([1]), torch.tensor([[1.5, 0.0]]),
                            torch.tensor([[0.0, 1.0]]), torch.eye(2), [10.0, 10.0], [10, 10], logit_scale=1.0)
    assert (res.beta, res.alpha, res.correct) == (pytest.approx(0.1), pytest.approx(1.09), 1)


def test_no_validation_split_is_an_error_unless_the_search_is_off(tiny):
    m = create_method("tip_adapter", tiny, NAMES, SMALL_GRID)
    feats = Features(tiny.model.text_projection.shape[1])
    with pytest.raises(ConfigError, match="no validation split.*method.search=false"):
        m.prepare(Splits(NAMES, n_val=0, name="imagenet"), feats)
    assert feats.requests == []  # refused before any feature was computed
    m = create_method("tip_adapter", tiny, NAMES, {"search": False, "init_alpha": 2.0})
    m.set_classnames(NAMES, dataset="imagenet")
    m.prepare(Splits(NAMES, n_val=0, name="imagenet"), feats)
    assert (float(m.alpha), float(m.beta)) == (2.0, 1.0) and m.evaluation_info()["search"] == "off"
    assert ("val", 0, None) not in feats.requests


def test_tip_f_trains_the_keys_only(tiny, vit_b16):
    dim = tiny.model.text_projection.shape[1]
    m, _ = prepared(tiny, "tip_adapter_f")
    assert m.num_trainable_parameters() == len(NAMES) * 3 * dim  # N * K * E
    assert [n for n, p in m.named_parameters() if p.requires_grad] == ["cache_keys"]
    # ViT-B/16 (E = 512): 16 shots of 3 classes
    names = ["a", "b", "c"]
    v = create_method("tip_adapter_f", vit_b16, names, {"search": False})
    v.prepare(Splits(names), Features(512, n_classes=3, shots=16))
    assert v.num_trainable_parameters() == 16 * 3 * 512 == 24_576
    assert all(not p.requires_grad for p in vit_b16.model.parameters())


def test_untrained_tip_f_is_tip_adapter(tiny, images):
    dim = tiny.model.text_projection.shape[1]
    tip, _ = prepared(tiny, "tip_adapter", features=Features(dim, seed=3))
    tipf, _ = prepared(tiny, "tip_adapter_f", features=Features(dim, seed=3))
    assert (float(tip.alpha), float(tip.beta)) == (float(tipf.alpha), float(tipf.beta))
    with torch.no_grad():
        assert torch.equal(tip.eval()(images), tipf.eval()(images))


def test_tip_f_step_then_search(tiny, images):
    dim = tiny.model.text_projection.shape[1]
    m, feats = prepared(tiny, "tip_adapter_f", features=Features(dim, seed=1))
    keys0, labels = feats.train
    m.alpha.fill_(0.7)  # searched values must not enter training: it uses init_alpha=3, init_beta=1
    m.beta.fill_(9.0)
    f = image_features64(tiny, images)
    y = torch.tensor([0, 3, 1])
    out = m.train().training_step(images, y, StepInfo.single(y))
    w = text_weights64(tiny, NAMES, ["a photo of a {}."])
    expected = tip_logits64(f, w, keys0, labels, len(NAMES), 3.0, 1.0)
    assert torch.allclose(out.logits.double(), expected, atol=1e-4, rtol=1e-5)
    assert out.loss.item() == pytest.approx(F.cross_entropy(expected, y).item(), rel=1e-5)
    opt = build_optimizer(from_mapping(TrainConfig, {"optimizer": "adamw", "lr": 0.01, "eps": 1e-4}), m.param_groups())
    opt.zero_grad()
    out.loss.backward()
    opt.step()
    assert not torch.equal(m.cache_keys.detach(), keys0)
    m.on_epoch_end(0)  # searches again with the trained keys
    vf, vl = feats.val
    s = m.settings()
    acc, beta, alpha = brute_force(vf.double(), vl, m.cache_keys.detach(), labels, len(NAMES), w,
                                   s["search_scale"], s["search_step"])
    assert (float(m.beta), float(m.alpha)) == pytest.approx((beta, alpha)) and m.last_search.correct == acc


def test_unseen_classes_are_a_clear_error(tiny, images):
    m, _ = prepared(tiny)
    with pytest.raises(ConfigError, match="cannot classify unseen classes.*--protocol fewshot"):
        m.set_classnames(["yellow moon", "bird"], split="new")
    with pytest.raises(ConfigError, match="asked for new classes"):
        m.set_classnames(NAMES, split="new")
    with pytest.raises(ConfigError, match="cannot classify unseen classes.*'bird'"):
        m.set_classnames(["cat", "bird"], dataset="other", split="all")
    assert m.classnames == NAMES  # unchanged by the refused calls
    # a subset or reordering of the cached classes uses the matching cache columns
    with torch.no_grad():
        full = m.eval()(images)
        m.set_classnames(["blue ring", "cat"], split="all")
        sub = m(images)
    assert torch.allclose(sub, full[:, [3, 0]], atol=1e-5)


def test_protocols_with_unseen_classes_fail_before_any_work(tiny, tmp_path):
    from vladapt.protocols.runner import RunSettings, run_protocol

    settings = RunSettings(backbone=tiny, root=tmp_path / "nothing", method="tip_adapter_f")
    for protocol in ("base2new", "cross_dataset"):
        with pytest.raises(ConfigError, match="cannot classify unseen classes.*--protocol fewshot"):
            run_protocol(protocol, settings, "caltech101", 16, 1)


@pytest.mark.parametrize("name", ["tip_adapter", "tip_adapter_f"])
def test_checkpoint_round_trip(tiny, images, tmp_path, name):
    dim = tiny.model.text_projection.shape[1]
    m, _ = prepared(tiny, name, features=Features(dim, seed=2))
    if name == "tip_adapter_f":
        with torch.no_grad():
            m.cache_keys.add_(0.05)
    state = m.checkpoint_state()
    assert set(state) == {"cache_keys", "cache_values", "alpha", "beta"} and state["cache_keys"].shape == (12, dim)
    save_checkpoint(tmp_path, m, {"method": name, "backbone": {"fingerprint": "x"}})
    with torch.no_grad():
        expected = m.eval()(images)
    # an unprepared method (empty cache) and one prepared on a cache of another size (2 shots)
    fresh = create_method(name, tiny, NAMES, SMALL_GRID)
    other, _ = prepared(tiny, name, features=Features(dim, shots=2, seed=9))
    for target in (fresh, other):
        load_checkpoint(tmp_path, target)
        assert target.cache_keys.shape == (12, dim) and float(target.alpha) == float(m.alpha)
        with torch.no_grad():
            assert torch.equal(target.eval()(images), expected)
    bad = create_method(name, tiny, NAMES[:3])
    with pytest.raises(ConfigError, match="does not fit"):
        load_checkpoint(tmp_path, bad)


def test_bad_config_values(tiny):
    for cfg, match in [({"search_scale": [7.0]}, "search_scale"), ({"search_step": [200, 0]}, "search_step"),
                       ({"augment_epoch": 0}, "augment_epoch"), ({"templates": "no placeholder"}, "template"),
                       ({"init_alpha": -1.0}, "init_alpha"), ({"unknown": 1}, "unknown config key")]:
        with pytest.raises(ConfigError, match=match):
            create_method("tip_adapter", tiny, NAMES, cfg)
    with pytest.raises(ConfigError, match="FeatureSource"):
        create_method("tip_adapter", tiny, NAMES).prepare(Splits(NAMES), None)


def test_packaged_configs():
    from dataclasses import asdict

    from vladapt.engine.runconfig import packaged_config, resolve_run_config

    defaults = asdict(TipAdapterConfig())
    for name in ("tip_adapter", "tip_adapter_f"):
        method_cfg, train = resolve_run_config(name, "fewshot")
        assert method_cfg == defaults  # the published setting is the default (what `vladapt eval` uses)
        # the tiny model's own logit scale (19.5) instead of OpenAI CLIP's literal 100 (chosen on held-out data)
        assert resolve_run_config(name, "demo")[0] == {**defaults, "logit_scale": None}
        assert resolve_run_config(name, "dg")[0] == {**defaults, "search": False}  # ImageNet has no val split
        assert packaged_config(name, "base2new") is None and packaged_config(name, "cross_dataset") is None
    _, train = resolve_run_config("tip_adapter_f", "fewshot")
    assert (train.optimizer, train.lr, train.eps, train.weight_decay, train.epochs, train.batch_size, train.schedule,
            train.scheduler, train.min_lr, train.warmup_epochs, train.crop_scale) == (
        "adamw", 0.001, 1e-4, 0.01, 20, 256, "iteration", "cosine", 0.0, 0, [0.5, 1.0])
