"""The method contract: prepare with frozen features, parameter groups, epoch hooks, checkpoint state,
the per-iteration schedule and registration by discovery, exercised by a feature-level head."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from test_heba_engine import color_folder, quick_cfg
from vladapt.data import ImageDataset, load_custom
from vladapt.engine.checkpoint import load_checkpoint
from vladapt.engine.features import FrozenFeatures
from vladapt.engine.train import _set_lr, build_optimizer, fit
from vladapt.errors import ConfigError
from vladapt.methods import create_method, list_methods
from vladapt.methods.base import Method, StepOutput
from vladapt.methods.registry import _METHODS, MethodInfo, register_method
from vladapt.protocols.runner import RunSettings, run_protocol


@dataclass
class _HeadConfig:
    pass


class _PrototypeHead(Method):
    """A feature-level head: class prototypes of frozen features fitted in ``prepare`` (a checkpointed
    buffer), a learned residual on the image feature and a learned temperature (no weight decay)."""

    Config = _HeadConfig
    trainable = True

    def __init__(self, backbone, classnames, config=None):
        super().__init__(backbone, classnames, config)
        dim = backbone.model.cfg.embed_dim
        self.delta = nn.Parameter(torch.zeros(dim))
        self.log_temp = nn.Parameter(torch.tensor(math.log(10.0)))
        self.register_state_buffer("prototypes", None)
        self.events: list = []
        self.features_seen = None

    def prepare(self, train, features):
        f, y = features.image_features("train")
        self.features_seen = (f, y)
        self.prototypes = F.normalize(torch.stack([f[y == c].mean(0) for c in range(len(self.classnames))]), dim=-1)
        self.events.append("prepare")

    def param_groups(self):
        return [{"params": [self.delta]}, {"params": [self.log_temp], "weight_decay": 0.0, "lr_scale": 0.5}]

    def _logits(self, images):
        with torch.no_grad():
            f = self.clip.encode_image(images.to(self.device)).float()
        return self.log_temp.exp() * F.normalize(f + self.delta, dim=-1) @ self.prototypes.t()

    def training_step(self, images, labels, step=None):
        logits = self._logits(images)
        return StepOutput(loss=F.cross_entropy(logits, labels), logits=logits, labels=labels)

    def on_epoch_end(self, epoch):
        self.events.append(epoch)

    def forward(self, images):
        return self._logits(images)


@pytest.fixture
def head(monkeypatch):
    monkeypatch.setitem(_METHODS, "prototype_head", MethodInfo("prototype_head", _PrototypeHead))
    _PrototypeHead.registry_name = "prototype_head"


@pytest.fixture(scope="module")
def colors(tmp_path_factory):
    return color_folder(tmp_path_factory.mktemp("colors") / "data", per_class=6)


def test_the_protocol_prepares_with_frozen_features_then_trains(head, colors, tiny):
    made = {}

    def train_fn(method, splits, seed, run_dir):
        made["method"] = method
        made["splits"] = splits
        fit(method, splits, quick_cfg(epochs=2), seed, progress=False)

    settings = RunSettings(backbone=tiny, root=colors, method="prototype_head", train_fn=train_fn, progress=False)
    rec = run_protocol("fewshot", settings, "folder", shots=2, seed=1)
    m, splits = made["method"], made["splits"]
    assert m.events == ["prepare", 0, 1]  # prepare once before training, the hook after each epoch
    # the features prepare saw are the frozen backbone's on the test transform, computed independently here
    images = torch.stack([ImageDataset(splits.train, splits.image_root, tiny.test_transform)[i][0]
                          for i in range(len(splits.train))])
    with torch.no_grad():
        expected = F.normalize(tiny.model.encode_image(images).float(), dim=-1)
    f, y = m.features_seen
    assert torch.allclose(f, expected, atol=1e-5) and y.tolist() == [d.label for d in splits.train]
    assert rec["trained"] and rec["results"]["test"]["total"] > 0


def test_augmented_feature_passes_are_seeded_and_averaged(colors, tiny):
    splits = load_custom(colors, save_split=False)
    a = FrozenFeatures(tiny, splits, seed=3).image_features("val", augment_passes=2)[0]
    b = FrozenFeatures(tiny, splits, seed=3).image_features("val", augment_passes=2)[0]
    c = FrozenFeatures(tiny, splits, seed=4).image_features("val", augment_passes=2)[0]
    plain = FrozenFeatures(tiny, splits).image_features("val")[0]
    assert torch.equal(a, b) and not torch.allclose(a, c) and not torch.allclose(a, plain)
    assert torch.allclose(a.norm(dim=-1), torch.ones(len(a)))


def test_param_groups_set_weight_decay_and_lr_scale(head, tiny):
    m = create_method("prototype_head", tiny, ["a", "b"])
    with torch.no_grad():
        m.delta.fill_(1.0)
        m.log_temp.fill_(1.0)
    opt = build_optimizer(quick_cfg(lr=0.1, weight_decay=0.5, momentum=0.0), m.param_groups())
    _set_lr(opt, 0.1)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.05]
    for p in (m.delta, m.log_temp):
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.allclose(m.delta, torch.full_like(m.delta, 1.0 - 0.1 * 0.5))  # decayed
    assert float(m.log_temp.detach()) == 1.0  # excluded from weight decay


def test_checkpoint_state_holds_fitted_buffers(head, colors, tiny, tmp_path):
    splits = load_custom(colors, save_split=False)
    m = create_method("prototype_head", tiny, splits.classnames)
    m.prepare(splits, FrozenFeatures(tiny, splits))
    fit(m, splits, quick_cfg(epochs=1), seed=0, run_dir=tmp_path / "run", progress=False)
    assert set(m.checkpoint_state()) == {"delta", "log_temp", "prototypes"}
    again = create_method("prototype_head", tiny, splits.classnames)
    again.prototypes = torch.zeros(1, 64)  # another shape: the checkpoint's buffer replaces it
    load_checkpoint(tmp_path / "run", again, tiny.fingerprint)
    assert torch.equal(again.prototypes, m.prototypes) and torch.equal(again.delta, m.delta)
    with pytest.raises(ConfigError, match="does not fit"):
        load_checkpoint(tmp_path / "run", create_method("prototype_head", tiny, splits.classnames).requires_grad_(False),
                        tiny.fingerprint)


def test_iteration_schedule_sets_the_rate_every_step_and_stops(head, colors, tiny):
    splits = load_custom(colors, save_split=False)
    m = create_method("prototype_head", tiny, splits.classnames)
    m.prepare(splits, FrozenFeatures(tiny, splits))
    rates = []
    real = m.training_step

    def record(images, labels, step=None):
        rates.append(opt_holder["lr"]())
        return real(images, labels, step)

    opt_holder = {}
    real_build = build_optimizer

    def spy_build(cfg, groups):
        opt = real_build(cfg, groups)
        opt_holder["lr"] = lambda: opt.param_groups[0]["lr"]
        return opt

    m.training_step = record
    import vladapt.engine.train as train_mod

    train_mod.build_optimizer, saved = spy_build, train_mod.build_optimizer
    try:
        cfg = quick_cfg(schedule="iteration", iterations=7, lr=0.1, min_lr=0.001, batch_size=4)
        fit(m, splits, cfg, seed=0, progress=False)
    finally:
        train_mod.build_optimizer = saved
    expected = [0.001 + 0.5 * (0.1 - 0.001) * (1 + math.cos(math.pi * i / 7)) for i in range(7)]
    assert rates == pytest.approx(expected)  # 7 steps over 2 epochs of 4 batches, then it stops
    assert m.events == ["prepare", 0, 1]
    with pytest.raises(ConfigError, match="schedule=iteration"):
        quick_cfg(iterations=5)


def test_methods_register_themselves_and_names_are_unique():
    methods = list_methods()
    assert {"zeroshot", "heba", "mma", "rmadapter", "lathadapter", "coop", "cocoop"} <= set(methods)
    assert methods["heba"].trainable and not methods["zeroshot"].trainable
    with pytest.raises(ValueError, match="registered twice"):
        register_method("heba")(type("Other", (Method,), {}))


def test_train_mode_leaves_the_frozen_backbone_in_eval_mode(tiny):
    m = create_method("mma", tiny, ["a", "b"], {"adapter_start": 1}).train()
    assert m.training and all(a.training for a in m.adapters.values())
    assert not tiny.model.training and not any(mod.training for mod in tiny.model.modules())
