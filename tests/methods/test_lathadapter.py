"""LatHAdapter: the training step against an independent float64 computation, each loss term in its
satisfied and violated configuration, gradients and parameter groups, inference variants, new classes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vladapt.config import from_mapping
from vladapt.engine.train import TrainConfig, build_optimizer
from vladapt.errors import ConfigError
from vladapt.methods import create_method
from vladapt.methods.base import StepInfo
from vladapt.methods.lathadapter import HierarchyNodes

NAMES = ["cat", "dog", "red star", "blue ring", "green cross"]
NEW = ["yellow moon", "bird", "purple square"]


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(3)
    return torch.randn(5, 3, 32, 32, generator=g), torch.tensor([0, 2, 2, 4, 0])


def perturbed(tiny, config=None, seed=0):
    """A LatHAdapter whose projections, scales and curvature are moved off their initial values, so a
    dropped H, a swapped alpha or an ignored curvature changes the numbers."""
    torch.manual_seed(seed)
    m = create_method("lathadapter", tiny, NAMES, config)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for proj in (m.visual_projection, m.text_projection):
            if proj is not None:
                proj.weight.add_(0.3 * torch.randn(proj.weight.shape, generator=g))
        m.visual_scale.log_value.fill_(math.log(0.2))
        m.text_scale.log_value.fill_(math.log(0.07))
        if m.manifold.curvature is not None:
            m.manifold.curvature.log_value.fill_(math.log(1.7))
        m.hyperbolic_logit_scale.log_value.fill_(math.log(9.0))
    return m


# ----------------------------------------------------------------------------- independent float64 maths
def lorentz_exp0(v, c):
    n = v.norm(dim=-1, keepdim=True)
    return torch.sinh(math.sqrt(c) * n) / (math.sqrt(c) * n) * v


def lorentz_time(x, c):
    return torch.sqrt(1 / c + (x * x).sum(-1))


def lorentz_dist(x, y, c):
    inner = (x * y).sum(-1) - lorentz_time(x, c) * lorentz_time(y, c)
    return torch.acosh((-c * inner).clamp_min(1 + 1e-12)) / math.sqrt(c)


def meru_entailment(x, y, c, k=0.1):
    """MERU's closed forms: relu(ext(x, y) - aper(x))."""
    xt, yt = lorentz_time(x, c), lorentz_time(y, c)
    cxy = c * ((x * y).sum(-1) - xt * yt)
    ext = torch.acos((yt + cxy * xt) / (x.norm(dim=-1) * torch.sqrt(cxy**2 - 1)))
    aper = torch.asin((2 * k / (math.sqrt(c) * x.norm(dim=-1))).clamp(max=1.0))
    return torch.relu(ext - aper)


def manual_step(m, tiny, images, labels, order="category_first"):
    """The loss and its terms of one step, computed in float64 from the weights alone."""
    clip, E = tiny.model, m.dim
    d = lambda t: t.detach().double()  # noqa: E731
    with torch.no_grad():
        v = clip.encode_image(images).double()
        t = clip.encode_text(tiny.tokenizer([f"a photo of a {c}." for c in NAMES])).double()
    v = F.normalize(v, dim=-1) * math.sqrt(E)
    t = F.normalize(t, dim=-1) * math.sqrt(E)

    def adapter(x, a, ratio):
        return ratio * F.relu(F.relu(x @ d(a.fc1.weight).t()) @ d(a.fc2.weight).t()) + (1 - ratio) * x

    vh, th = adapter(v, m.visual_adapter, 0.2), adapter(t, m.text_adapter, 0.2)
    s = float(clip.logit_scale.exp())
    logits = s * F.normalize(vh, dim=-1) @ F.normalize(th, dim=-1).t()
    ce = F.cross_entropy(logits, labels)

    classes = sorted(set(labels.tolist()))
    pos = torch.tensor([classes.index(y) for y in labels.tolist()])
    # attribute prompts, CoOp's way: "X X X X {name}." with the placeholders' embeddings replaced
    K, M = m.config.num_attributes, m.config.attribute_length
    tokens = tiny.tokenizer([" ".join(["X"] * M) + f" {NAMES[c]}." for c in classes])
    emb = clip.token_embedding(tokens)
    attrs = []
    for k in range(K):
        e = emb.clone()
        e[:, 1:1 + M] = m.attribute_context[k].detach()
        with torch.no_grad():
            attrs.append(clip.encode_text_embeddings(e, tokens.argmax(-1)).double())
    a = torch.stack(attrs, 1)  # [C_B, K, E]
    ah = adapter(F.normalize(a, dim=-1) * math.sqrt(E), m.text_adapter, 0.2)

    c = float(m.manifold.curvature().detach())
    av, at = float(m.visual_scale.value().detach()), float(m.text_scale.value().detach())
    Hv, Ht = d(m.visual_projection.weight), d(m.text_projection.weight)
    h = lorentz_exp0(av * vh @ Hv.t(), c)
    g = lorentz_exp0(at * th[classes] @ Ht.t(), c)
    u = lorentz_exp0(at * ah @ Ht.t(), c)
    sh = float(m.hyperbolic_logit_scale.value().detach())
    terms = {"ce": ce}
    terms["contrast"] = F.cross_entropy(-sh * lorentz_dist(h[:, None], g[None], c), pos)
    ui = u[pos]
    if order == "category_first":
        terms["entail_category_attribute"] = meru_entailment(g[:, None], u, c).mean()
        w = torch.softmax(-lorentz_dist(ui, h[:, None], c) / 0.1, dim=-1)
        terms["entail_attribute_image"] = (w * meru_entailment(ui, h[:, None], c)).sum(1).mean()
    else:
        terms["entail_attribute_category"] = meru_entailment(u, g[:, None], c).mean()
        terms["entail_category_image"] = meru_entailment(g[pos], h, c).mean()
    an = F.normalize(ah, dim=-1)
    cos = an @ an.transpose(1, 2)
    terms["diversity"] = ((cos**2).sum((1, 2)) - K).mean() / (K * (K - 1))  # diagonal cos^2 = 1
    weights = {"ce": 1.0, "contrast": 0.5, "diversity": 0.1}
    loss = sum(weights.get(name, 0.2) * value for name, value in terms.items())
    return loss, logits, terms, (g, u, h)


@pytest.mark.parametrize("order", ["category_first", "attribute_first"])
def test_training_step_equals_an_independent_float64_computation(tiny, batch, order):
    images, labels = batch
    m = perturbed(tiny, {"hierarchy": order})
    out = m.training_step(images, labels, StepInfo.single(labels))
    loss, logits, terms, (g, u, h) = manual_step(m, tiny, images, labels, order)
    torch.testing.assert_close(out.logits.double(), logits, rtol=1e-5, atol=1e-4)
    assert set(out.extras) == set(terms) | {"depth_category", "depth_attribute", "depth_image"}
    for name, value in terms.items():
        assert out.extras[name] == pytest.approx(float(value), rel=2e-4, abs=2e-5), name
    assert float(out.loss.detach()) == pytest.approx(float(loss), rel=2e-4)
    c = float(m.manifold.curvature().detach())
    depth = lambda x: (torch.asinh(math.sqrt(c) * x.norm(dim=-1)) / math.sqrt(c)).mean()  # noqa: E731
    assert out.extras["depth_category"] == pytest.approx(float(depth(g)), rel=1e-5)
    assert out.extras["depth_attribute"] == pytest.approx(float(depth(u)), rel=1e-5)
    assert out.extras["depth_image"] == pytest.approx(float(depth(h)), rel=1e-5)
    assert all(v > 0 for v in terms.values())  # the check covers every term with a non-zero value


def test_zero_ratios_and_weights_give_zero_shot_clip(tiny, batch):
    """LATHADAPTER.md §9's sanity check: no adapter, no regularizer -> zero-shot CLIP, in training and inference."""
    images, labels = batch
    cfg = {"visual_ratio": 0.0, "text_ratio": 0.0, "contrast_weight": 0.0, "entailment_weight": 0.0,
           "diversity_weight": 0.0, "templates": "a photo of a {}."}
    m = create_method("lathadapter", tiny, NAMES, cfg)
    zs = create_method("zeroshot", tiny, NAMES, {"templates": "a photo of a {}."})
    out = m.training_step(images, labels, StepInfo.single(labels))
    m.eval()
    with torch.no_grad():
        expected = zs(images)
        torch.testing.assert_close(m(images), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits.detach(), expected, rtol=1e-5, atol=1e-5)
    assert set(out.extras) == {"ce"} and float(out.loss) == pytest.approx(float(F.cross_entropy(expected, labels)))


def _nodes(g, u, h, pos, attributes=None):
    classes = torch.arange(len(g))
    return HierarchyNodes(classes, torch.tensor(pos), attributes if attributes is not None else u, h, g, u)


def test_each_term_is_zero_when_satisfied_and_positive_when_violated(tiny):
    m = create_method("lathadapter", tiny, NAMES, {"num_attributes": 2})
    E = m.dim
    e = torch.eye(E)
    # two classes on orthogonal rays; attributes further out near their category's ray, images further still
    g = torch.stack([1.0 * e[0], 1.0 * e[1]])
    u = torch.stack([torch.stack([2.0 * e[0] + 0.01 * e[2], 2.0 * e[0] + 0.01 * e[3]]),
                     torch.stack([2.0 * e[1] + 0.01 * e[2], 2.0 * e[1] + 0.01 * e[3]])])
    h = torch.stack([6.0 * e[0], 6.0 * e[1], 6.0 * e[1] + 0.001 * e[2]])
    pos = [0, 1, 1]
    attrs = torch.stack([torch.stack([e[2], e[3]]), torch.stack([e[4], e[5]])])  # orthogonal within each class
    good = m.hierarchy_losses(_nodes(g, u, h, pos, attrs))
    assert good["entail_category_attribute"] == 0 and good["entail_attribute_image"] == 0
    assert good["diversity"] == 0
    assert good["contrast"].item() < 1e-3  # images far nearer their own category (s_h = 1/0.07)
    # violated: the hierarchy upside down, images at the other class, identical attributes
    bad = m.hierarchy_losses(_nodes(h[:2], u, g[[0, 1, 1]], pos, torch.stack([attrs[:, 0], attrs[:, 0]], 1)))
    assert bad["entail_category_attribute"] > 0.5 and bad["entail_attribute_image"] > 0.5
    assert bad["diversity"].item() == pytest.approx(1.0)
    swapped = m.hierarchy_losses(_nodes(g, u, h, [1, 0, 0], attrs))
    assert swapped["contrast"].item() > 10
    # the other order: attributes entail categories, categories entail images
    m2 = create_method("lathadapter", tiny, NAMES, {"num_attributes": 2, "hierarchy": "attribute_first"})
    roots = 0.05 * g[:, None].expand(-1, 2, -1)  # the attributes of each class near the origin on its ray
    ok = m2.hierarchy_losses(_nodes(g, roots, h, pos))
    assert ok["entail_attribute_category"] == 0 and ok["entail_category_image"] == 0
    rev = m2.hierarchy_losses(_nodes(g, u, g[[0, 1, 1]] * 0.5, pos))
    assert rev["entail_attribute_category"] > 0.5 and rev["entail_category_image"] > 0.5


def test_assignment_weights_soft_and_hard_straight_through(tiny):
    m = create_method("lathadapter", tiny, NAMES, {"num_attributes": 3})
    E = m.dim
    u = torch.randn(2, 3, E) * 0.3
    h = (u[:, 1] * 1.5).requires_grad_()  # nearest to attribute 1
    w = m.assignment_weights(u, h)
    d = torch.stack([m.manifold.dist(u[:, k], h) for k in range(3)], -1)
    torch.testing.assert_close(w, torch.softmax(-d / 0.1, -1))
    hard = create_method("lathadapter", tiny, NAMES, {"num_attributes": 3, "assignment": "hard"})
    wh = hard.assignment_weights(u, h)
    assert torch.equal(wh.detach(), F.one_hot(torch.tensor([1, 1]), 3).float())
    (g_soft,) = torch.autograd.grad((w * torch.arange(3.0)).sum(), h)
    (g_hard,) = torch.autograd.grad((wh * torch.arange(3.0)).sum(), h)
    torch.testing.assert_close(g_hard, g_soft)  # the softmax's gradient passes straight through


def test_prompts_curvature_and_scales_get_gradients_and_no_weight_decay(tiny, batch):
    images, labels = batch
    m = perturbed(tiny)
    m.training_step(images, labels, StepInfo.single(labels)).loss.backward()
    for name, p in m.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    groups = {g["name"]: g for g in m.param_groups()}
    assert groups["attributes"]["params"] == [m.attribute_context] and groups["attributes"]["lr_scale"] == 2.0
    scalars = {id(p) for p in groups["scalars"]["params"]}
    assert scalars == {id(m.manifold.curvature.log_value), id(m.visual_scale.log_value),
                       id(m.text_scale.log_value), id(m.hyperbolic_logit_scale.log_value)}
    every = [p for g in groups.values() for p in g["params"]]
    assert len(every) == len({id(p) for p in every}) == len(m.trainable_parameters())
    opt = build_optimizer(from_mapping(TrainConfig, {"optimizer": "adamw", "weight_decay": 0.05}), m.param_groups())
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert all(decay[i] == 0.0 for i in scalars) and decay[id(m.visual_adapter.fc1.weight)] == 0.05
    # no gradient reaches the frozen backbone
    assert all(p.grad is None for p in tiny.model.parameters())
    fixed = create_method("lathadapter", tiny, NAMES, {"learn_curvature": False})
    assert not fixed.manifold.curvature.log_value.requires_grad
    assert len([g for g in fixed.param_groups() if g["name"] == "scalars"][0]["params"]) == 3


def test_vit_b16_parameter_counts(vit_b16):
    bb = vit_b16
    m = create_method("lathadapter", bb, ["a", "b"])
    adapters, projections, prompts, scalars = 2 * (512 * 128 * 2), 2 * 512 * 512, 4 * 4 * 512, 4
    assert m.num_trainable_parameters() == adapters + projections + prompts + scalars == 794_628
    b = create_method("lathadapter", bb, ["a", "b"], {"attributes": "vectors", "num_attributes": 8, "projection": False})
    assert b.num_trainable_parameters() == adapters + 8 * 512 + scalars
    assert all(not p.requires_grad for p in bb.model.parameters())


def test_inference_variants_and_new_classes_from_names_alone(tiny, batch):
    images, _ = batch
    base = perturbed(tiny)
    variants = {"zeroshot_weight": 0.5, "hyperbolic_weight": 0.3, "attribute_weight": 0.7}
    full = perturbed(tiny, variants)
    full.load_checkpoint_state(base.checkpoint_state())
    for m in (base, full):
        m.eval()
        m.set_classnames(NEW, split="new")
    zs = create_method("zeroshot", tiny, NEW, {"templates": "a photo of a {}."})
    with torch.no_grad():
        plain, mixed, zero = base(images), full(images), zs(images)
        s = float(tiny.model.logit_scale.exp())
        vh = full.adapt_image(full.image_inputs(images))
        th = full.adapt_text(full.category_features())
        d = full.manifold.pairwise_dist(full.lift_image(vh), full.lift_text(th))
        a = full.attribute_features(torch.arange(len(NEW)))  # new classes: their names in the learned prompts
        attr = (s * torch.einsum("be,cke->bck", F.normalize(vh, dim=-1), F.normalize(a, dim=-1))).amax(-1)
    assert plain.shape == (5, len(NEW))
    expected = plain + 0.5 * zero - 0.3 * float(full.hyperbolic_logit_scale.value().detach()) * d + 0.7 * attr
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-4)
    assert full.evaluation_info()["inference"] == "adapter+zeroshot+hyperbolic+attribute"
    with pytest.raises(ConfigError, match="attribute_weight"):
        create_method("lathadapter", tiny, NAMES, {"attributes": "vectors", "attribute_weight": 1.0})


def test_design_b_vectors_start_at_attribute_words_and_checkpoint_round_trip(tiny, batch):
    images, labels = batch
    m = create_method("lathadapter", tiny, NAMES, {"attributes": "vectors", "num_attributes": 3,
                                                   "attribute_words": ["color", "shape"]})
    with torch.no_grad():
        words = tiny.model.encode_text(tiny.tokenizer(["color", "shape", "color"]))
    torch.testing.assert_close(m.attribute_vectors.detach(), F.normalize(words, dim=-1) * math.sqrt(m.dim))
    m.training_step(images, labels, StepInfo.single(labels)).loss.backward()
    assert m.attribute_vectors.grad.abs().sum() > 0
    other = create_method("lathadapter", tiny, NAMES, {"attributes": "vectors", "num_attributes": 3})
    other.load_checkpoint_state(m.checkpoint_state())
    m.eval(), other.eval()
    with torch.no_grad():
        assert torch.equal(m(images), other(images))
