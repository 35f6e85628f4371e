"""Parity with the authors' released code: vladapt's HeBA, MMA, LwEIB, CoOp and CoCoOp compute the
reference's numbers.

The fixtures in ``tests/fixtures/parity/`` were recorded by ``benchmarks/parity_heba.py``,
``benchmarks/parity_mma.py``, ``benchmarks/parity_lweib.py`` and ``benchmarks/parity_coop.py``, which
run the authors' code from a checkout (see their docstrings for what is stubbed and why). Given the
same frozen backbone (the tiny test CLIP rounded to fp16; checked by fingerprint), the same adapter
weights or learned context (mapped from the reference's parameter names to vladapt's) and the same
inputs, vladapt must reproduce the reference's token ids exactly, and its logits, losses and every
adapter gradient to fp32 rounding:

    |vladapt - reference| <= ATOL * max|reference| + RTOL * |reference|      (per tensor)

with RTOL = 1e-4 and ATOL = 1e-5 (the absolute part is relative to the tensor's largest magnitude).
Gradients of large tensors are compared through the sketch the fixture stores
(``parity_common.grad_sketch``: row sums, column sums, every 61st entry, sum of squares).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vladapt.backbones import load_clip
from vladapt.engine.train import StepInfo
from vladapt.methods import create_method

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "parity"


def _load_parity_common():
    """``benchmarks/parity_common.py``: the fingerprint, weight coding and gradient sketch the
    fixtures were written with (loaded by path: ``benchmarks`` is not a package)."""
    spec = importlib.util.spec_from_file_location("parity_common", ROOT / "benchmarks" / "parity_common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pc = _load_parity_common()

RTOL = 1e-4
ATOL = 1e-5
# max |diff| / max|reference| per compared tensor, for reporting (pytest -s prints them)
OBSERVED: dict[str, float] = {}


def close(name: str, actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL, atol: float = ATOL,
          scale: float | None = None) -> None:
    """Assert the tolerance above; ``scale`` replaces max|reference| as the magnitude of the tensor."""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != reference {tuple(expected.shape)}"
    if not scale:  # None, or 0 for an all-zero reference (e.g. the gradient of an adapter nothing reads)
        scale = float(expected.abs().max()) or 1.0
    diff = (actual - expected).abs()
    bound = atol * scale + rtol * expected.abs()
    OBSERVED[name] = float(diff.max()) / scale
    worst = int((diff - bound).argmax())
    assert bool((diff <= bound).all()), (
        f"{name}: differs from the reference: max |diff| {float(diff.max()):.3g} (max |ref| {scale:.3g}); "
        f"worst entry {worst}: vladapt {float(actual.flatten()[worst]):.6g} vs reference "
        f"{float(expected.flatten()[worst]):.6g}"
    )


def load_fixture(name: str) -> tuple[dict[str, torch.Tensor], dict]:
    st, js = FIXTURES / f"{name}.safetensors", FIXTURES / f"{name}.json"
    if not st.is_file() or not js.is_file():
        pytest.fail(f"parity fixture {name} missing in {FIXTURES}; regenerate it with benchmarks/parity_*.py")
    return load_file(str(st)), json.loads(js.read_text())


@pytest.fixture(scope="module")
def tiny_fp16(tiny):
    """A copy of the session's tiny backbone with every weight rounded to fp16, and its fingerprint."""
    bb = dataclasses.replace(tiny, model=copy.deepcopy(tiny.model), _fingerprint=None)
    pc.round_to_fp16_(bb.model)
    return bb, pc.fingerprint(bb.model.state_dict())


def fp16_backbone(meta: dict, tiny_fp16):
    """The backbone the fixture's reference run saw: the tiny CLIP rounded to fp16 (fingerprint checked)."""
    bb, got = tiny_fp16  # conftest's ``tiny``: load_clip("vladapt-test-tiny") with the default seed 0
    if (meta["backbone"]["name"], meta["backbone"]["seed"], meta["backbone"]["rounding"]) != (bb.name, 0, "fp16"):
        bb = load_clip(meta["backbone"]["name"], seed=meta["backbone"]["seed"])
        pc.round_to_fp16_(bb.model)
        got = pc.fingerprint(bb.model.state_dict())
    assert got == meta["backbone"]["fingerprint"], (
        f"the tiny backbone changed (fingerprint {got[:16]} != fixture's {meta['backbone']['fingerprint'][:16]}): "
        "the parity fixtures were recorded on other weights; regenerate them with benchmarks/parity_*.py"
    )
    return bb


def reference_weights(tensors: dict[str, torch.Tensor], meta: dict) -> dict[str, torch.Tensor]:
    """The adapter weights under the reference's parameter names (exact fp32 values)."""
    exps = meta["weight_exponents"]
    return {k[len("adapter/"):]: pc.dequantize(v, exps[k[len("adapter/"):]])
            for k, v in tensors.items() if k.startswith("adapter/")}


def load_mapped(method, weights: dict[str, torch.Tensor], to_vladapt) -> dict[str, str]:
    """Copy the reference weights into ``method``; returns {reference name: vladapt name}. The mapping
    must cover every trainable parameter exactly once; a 1x1 convolution ``[out, in, 1, 1]`` loads
    into a Linear ``[out, in]``."""
    params = {n: p for n, p in method.named_parameters() if p.requires_grad}
    assert set(params) == set(method.trainable_state_dict())
    mapping = {ref: to_vladapt(ref) for ref in weights}
    assert sorted(mapping.values()) == sorted(params), (
        f"reference -> vladapt names do not cover vladapt's trainable parameters: "
        f"unmatched vladapt {sorted(set(params) - set(mapping.values()))}, "
        f"unmatched reference {sorted(r for r, v in mapping.items() if v not in params)}"
    )
    with torch.no_grad():
        for ref, name in mapping.items():
            w, p = weights[ref], params[name]
            squeezed = w.shape[:2] if w.dim() == 4 and w.shape[2:] == (1, 1) and p.dim() == 2 else w.shape
            assert tuple(squeezed) == tuple(p.shape), f"{ref} {tuple(w.shape)} -> {name} {tuple(p.shape)}"
            p.copy_(w.reshape(p.shape))
    return mapping


def check_grads(label: str, prefix: str, tensors: dict[str, torch.Tensor], method, mapping: dict[str, str],
                weights: dict[str, torch.Tensor]) -> None:
    """Every adapter gradient against the fixture: in full, or its sketch. Row and column sums can
    cancel (e.g. the column sums of ``up``'s gradient vanish because the LayerNorm after it removes the
    mean): their magnitude is taken as (number of summed entries) x (rms entry of the reference)."""
    params = dict(method.named_parameters())
    for ref, name in mapping.items():
        g = params[name].grad
        assert g is not None, f"no gradient reached {name} ({ref})"
        sketch = pc.grad_sketch(g.reshape(weights[ref].shape))
        if "full" not in sketch:
            rms = float((tensors[f"{prefix}{ref}#sumsq"].double() / g.numel()).sqrt())
            rows, cols = len(sketch["cols"]), len(sketch["rows"])  # summed entries per row sum / column sum
        for part, value in sketch.items():
            scale = {"rows": rms * cols, "cols": rms * rows}.get(part) if "full" not in sketch else None
            close(f"{label} {prefix}{ref}#{part}", value, tensors[f"{prefix}{ref}#{part}"], scale=scale)


def step_info(labels: torch.Tensor) -> StepInfo:
    n = len(labels)
    return StepInfo(epoch=0, step=0, generator=torch.Generator().manual_seed(0), global_labels=labels,
                    local=slice(0, n), batch_size=n)


# ------------------------------------------------------------------------------------------- HeBA
HEBA_POSITIONS = {"att_conv": "attn_in", "mlp_conv": "mlp_hidden"}
HEBA_PARTS = {"down": "down", "up": "up", "mid": "depthwise", "norm": "norm"}


def heba_name(ref: str) -> str:
    """``visual_adapter.1.att_conv.mid.weight`` -> ``adapters.visual_blocks_0_attn_in.residual.branch.depthwise.weight``
    (the reference's blocks are 1-based, vladapt's point names 0-based)."""
    tower, layer, position, part, kind = ref.split(".")
    return (f"adapters.{tower.removesuffix('_adapter')}_blocks_{int(layer) - 1}_{HEBA_POSITIONS[position]}"
            f".residual.branch.{HEBA_PARTS[part]}.{kind}")


def heba_config(ref: dict, **overrides) -> dict:
    """vladapt's HeBA config for the reference's TRAINER.HeBA settings (label smoothing 0.1 and
    reduction 4 are hard-coded there; every class gets the released code's fallback prompt)."""
    cfg = {
        "adapter_start": ref["ADAPTER_START"],
        "adapter_end": ref["ADAPTER_END"],
        "scale": ref["ADAPTER_SCALE_BASE"],
        "scale_factor": ref["ADAPTER_SCALE_FACTOR"],
        "slow_fast_ratio": ref["SLOW_FAST_RATIO"],
        "neg_sampling_ratio": ref["NEG_SAMPLING_RATIO"],
        "text_prefix": ref["TEXT_CTX_INIT"],
        "label_smoothing": 0.1,
        "reduction": 4,
        "reference_prompts": True,
    }
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def heba_fixture(tiny_fp16):
    tensors, meta = load_fixture("heba_tiny")
    bb = fp16_backbone(meta, tiny_fp16)
    return tensors, meta, bb, reference_weights(tensors, meta)


def build_heba(heba_fixture, **overrides):
    tensors, meta, bb, weights = heba_fixture
    ref = meta["config"]["TRAINER"]["HeBA"]
    method = create_method("heba", bb, meta["classnames"], heba_config(ref, **overrides))
    mapping = load_mapped(method, weights, heba_name)
    return method, mapping


def test_heba_parameters_map_one_to_one(heba_fixture):
    tensors, meta, bb, weights = heba_fixture
    method, mapping = build_heba(heba_fixture)
    assert method.num_trainable_parameters() == meta["trainable_parameters"] == sum(w.numel() for w in weights.values())
    assert len(mapping) == len(set(mapping.values())) == len(weights)


def test_heba_tokens_equal_reference(heba_fixture, tmp_path):
    tensors, meta, bb, weights = heba_fixture
    method, _ = build_heba(heba_fixture)
    assert torch.equal(method._tokens.to(torch.int64), tensors["tokens/reference"].to(torch.int64))
    bank = tmp_path / "descriptions.json"
    bank.write_text(json.dumps(meta["descriptions"]))
    method, _ = build_heba(heba_fixture, descriptions=str(bank), strict_descriptions=False)
    assert torch.equal(method._tokens.to(torch.int64), tensors["tokens/descriptions"].to(torch.int64))


def test_heba_eval_logits_equal_reference(heba_fixture, tmp_path):
    tensors, meta, bb, weights = heba_fixture
    images = tensors["inputs/images"].float()
    method, _ = build_heba(heba_fixture)
    method.eval()
    with torch.no_grad():
        close("heba eval/logits", method(images), tensors["eval/logits"])
    method, _ = build_heba(heba_fixture, scale=meta["config_eval_large"]["ADAPTER_SCALE_BASE"])
    method.eval()
    with torch.no_grad():
        close("heba eval_large/logits", method(images), tensors["eval_large/logits"])
    bank = tmp_path / "descriptions.json"
    bank.write_text(json.dumps(meta["descriptions"]))
    method, _ = build_heba(heba_fixture, descriptions=str(bank), strict_descriptions=False)
    method.eval()
    with torch.no_grad():
        close("heba eval_desc/logits", method(images), tensors["eval_desc/logits"])


def test_heba_training_step_equals_reference(heba_fixture):
    """Loss, logits and every adapter gradient of one step (slow-fast off, all classes, one prompt)."""
    tensors, meta, bb, weights = heba_fixture
    images, labels = tensors["inputs/images"].float(), tensors["inputs/labels"]
    method, mapping = build_heba(heba_fixture)
    method.train()
    out = method.training_step(images, labels, step_info(labels))
    out.loss.backward()
    assert set(out.context.scales.values()) == {meta["config"]["TRAINER"]["HeBA"]["ADAPTER_SCALE_BASE"]}
    close("heba train/logits", out.logits, tensors["train/logits"])
    close("heba train/loss", out.loss.reshape(1), tensors["train/loss"])
    check_grads("heba", "train/grad/", tensors, method, mapping, weights)


def test_heba_training_step_with_negative_sampling_equals_reference(heba_fixture):
    """Negative sampling active and taking every absent class: the loss, the positives' logits and
    the gradients do not depend on the (random) order of the negatives."""
    tensors, meta, bb, weights = heba_fixture
    images, labels = tensors["inputs/images"].float(), tensors["inputs/labels_neg"]
    method, mapping = build_heba(heba_fixture, neg_sampling_ratio=meta["config_train_neg"]["NEG_SAMPLING_RATIO"])
    method.train()
    out = method.training_step(images, labels, step_info(labels))
    out.loss.backward()
    assert torch.equal(out.labels, tensors["train_neg/remapped"])
    npos = tensors["train_neg/logits_pos"].shape[1]
    assert out.logits.shape[1] == npos + tensors["train_neg/logits_neg_sorted"].shape[1]
    close("heba train_neg/logits_pos", out.logits[:, :npos], tensors["train_neg/logits_pos"])
    close("heba train_neg/logits_neg_sorted", out.logits[:, npos:].sort(dim=1).values,
          tensors["train_neg/logits_neg_sorted"])
    close("heba train_neg/loss", out.loss.reshape(1), tensors["train_neg/loss"])
    params = dict(method.named_parameters())
    for ref, name in mapping.items():
        g = params[name].grad.double()
        sumsq = tensors[f"train_neg/grad/{ref}#sumsq"]
        close(f"heba train_neg/grad/{ref}#sumsq", (g ** 2).sum().reshape(1), sumsq)
        # a sum may cancel: its magnitude is that of sqrt(n * sum of squares)
        close(f"heba train_neg/grad/{ref}#sum", g.sum().reshape(1), tensors[f"train_neg/grad/{ref}#sum"],
              scale=float((g.numel() * sumsq.double()).sqrt()))


# -------------------------------------------------------------------------------------------- MMA
def mma_name(ref: str) -> str:
    """``visual_adapter.1.down.0.weight`` -> ``adapters.visual_blocks_0_block_ln1.down.weight``,
    ``shared_adapter.1.0.bias`` -> ``shared.0.bias`` (the reference's blocks are 1-based)."""
    parts = ref.split(".")
    if parts[0] == "shared_adapter":
        return f"shared.{int(parts[1]) - 1}.{parts[-1]}"
    return f"adapters.{parts[0].removesuffix('_adapter')}_blocks_{int(parts[1]) - 1}_block_ln1.{parts[2]}.{parts[-1]}"


def mma_config(ref: dict, **overrides) -> dict:
    """vladapt's MMA config for the reference's TRAINER.MMADAPTER settings; everything else (plain
    cross-entropy, all classes every step, ReLU, the shared layer, "a photo of a {c}.") is left to
    vladapt's defaults, which must be MMA's."""
    cfg = {"adapter_start": ref["ADAPTER_START"], "adapter_end": ref["ADAPTER_END"], "dim": ref["ADAPTER_DIM"],
           "scale": ref["ADAPTER_SCALE"]}
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def mma_fixture(tiny_fp16):
    pytest.importorskip("vladapt.methods.mma", reason="vladapt's MMA (vladapt.methods.mma) has not landed yet")
    tensors, meta = load_fixture("mma_tiny")
    bb = fp16_backbone(meta, tiny_fp16)
    return tensors, meta, bb, reference_weights(tensors, meta)


def build_mma(mma_fixture, **overrides):
    tensors, meta, bb, weights = mma_fixture
    method = create_method("mma", bb, meta["classnames"], mma_config(meta["config"]["TRAINER"]["MMADAPTER"], **overrides))
    mapping = load_mapped(method, weights, mma_name)
    return method, mapping


def test_mma_parameters_and_tokens_equal_reference(mma_fixture):
    tensors, meta, bb, weights = mma_fixture
    method, mapping = build_mma(mma_fixture)
    assert method.num_trainable_parameters() == meta["trainable_parameters"] == sum(w.numel() for w in weights.values())
    assert len(mapping) == len(set(mapping.values())) == len(weights)
    tokens = method._tokens
    assert tokens.shape[1] == 1, "MMA uses one prompt per class"
    assert torch.equal(tokens[:, 0].to(torch.int64), tensors["tokens/prompts"].to(torch.int64))


def test_mma_eval_logits_equal_reference(mma_fixture):
    tensors, meta, bb, weights = mma_fixture
    images = tensors["inputs/images"].float()
    for key, overrides in (("eval", {}), ("eval_large", {"scale": meta["config_eval_large"]["ADAPTER_SCALE"]})):
        method, _ = build_mma(mma_fixture, **overrides)
        method.eval()
        with torch.no_grad():
            close(f"mma {key}/logits", method(images), tensors[f"{key}/logits"])


def test_mma_training_step_equals_reference(mma_fixture):
    """Logits, cross-entropy loss and every adapter gradient (both towers' down/up and the shared layers)."""
    tensors, meta, bb, weights = mma_fixture
    images, labels = tensors["inputs/images"].float(), tensors["inputs/labels"]
    method, mapping = build_mma(mma_fixture)
    method.train()
    out = method.training_step(images, labels, step_info(labels))
    out.loss.backward()
    close("mma train/logits", out.logits, tensors["train/logits"])
    close("mma train/loss", out.loss.reshape(1), tensors["train/loss"])
    check_grads("mma", "train/grad/", tensors, method, mapping, weights)


def test_zz_report_observed_differences():
    """Not a check: prints the largest observed differences (run with -s)."""
    if OBSERVED:
        worst = sorted(OBSERVED.items(), key=lambda kv: -kv[1])[:8]
        print(f"\nparity: {len(OBSERVED)} tensors compared; largest max|diff|/max|ref|:")
        for k, v in worst:
            print(f"  {v:.2e}  {k}")


# ------------------------------------------------------------------------------------------ LwEIB
def lweib_name(ref: str) -> str:
    """``text_adapter.1.att_conv.conv.weight`` -> ``adapters.text_blocks_0_attn_in.residual.branch.conv.weight``
    (the reference's blocks are 1-based, vladapt's point names 0-based)."""
    tower, layer, position, part, kind = ref.split(".")
    return (f"adapters.{tower.removesuffix('_adapter')}_blocks_{int(layer) - 1}_{HEBA_POSITIONS[position]}"
            f".residual.branch.{part}.{kind}")


@pytest.fixture(scope="module")
def lweib_fixture(tiny_fp16, tmp_path_factory):
    tensors, meta = load_fixture("lweib_tiny")
    bb = fp16_backbone(meta, tiny_fp16)
    banks = {}
    for key in ("descriptions", "descriptions_train"):
        path = tmp_path_factory.mktemp("lweib") / f"{key}.json"
        path.write_text(json.dumps(meta[key]))
        banks[key] = str(path)
    return tensors, meta, bb, reference_weights(tensors, meta), banks


def build_lweib(lweib_fixture, bank: str = "descriptions", **overrides):
    """vladapt's LwEIB with the reference's TRAINER.LWEIB settings; everything else (plain
    cross-entropy, the symmetric text convolution, kernel 3) is left to vladapt's defaults."""
    tensors, meta, bb, weights, banks = lweib_fixture
    ref = meta["config"]["TRAINER"]["LWEIB"]
    cfg = {"adapter_start": ref["ADAPTER_START"], "adapter_end": ref["ADAPTER_END"], "scale": ref["ADAPTER_SCALE"],
           "scale_factor": ref["ADAPTER_SCALE_FACTOR"], "slow_fast_ratio": ref["SLOW_FAST_RATIO"],
           "neg_sampling_ratio": ref["NEG_SAMPLING_RATIO"], "text_prefix": ref["TEXT_CTX_INIT"],
           "descriptions": banks[bank], **overrides}
    method = create_method("lweib", bb, meta["classnames"], cfg)
    return method, load_mapped(method, weights, lweib_name)


def test_lweib_parameters_and_tokens_equal_reference(lweib_fixture):
    tensors, meta, bb, weights, _ = lweib_fixture
    method, mapping = build_lweib(lweib_fixture)
    assert method.num_trainable_parameters() == meta["trainable_parameters"] == sum(w.numel() for w in weights.values())
    assert len(mapping) == len(set(mapping.values())) == len(weights)
    assert torch.equal(method._tokens.to(torch.int64), tensors["tokens/descriptions"].to(torch.int64))
    method, _ = build_lweib(lweib_fixture, bank="descriptions_train")
    assert torch.equal(method._tokens.to(torch.int64), tensors["tokens/one"].to(torch.int64))


def test_lweib_eval_logits_equal_reference(lweib_fixture):
    tensors, meta, bb, weights, _ = lweib_fixture
    images = tensors["inputs/images"].float()
    for key, overrides in (("eval", {}), ("eval_large", {"scale": meta["config_large"]["ADAPTER_SCALE"]})):
        method, _ = build_lweib(lweib_fixture, **overrides)
        method.eval()
        with torch.no_grad():
            close(f"lweib {key}/logits", method(images), tensors[f"{key}/logits"])


@pytest.mark.parametrize("key", ["train", "train_large"])
def test_lweib_training_step_equals_reference(lweib_fixture, key):
    """Loss, logits and every adapter gradient of one step (slow-fast off, all classes, one description)."""
    tensors, meta, bb, weights, _ = lweib_fixture
    images, labels = tensors["inputs/images"].float(), tensors["inputs/labels"]
    scale = meta["config_large"]["ADAPTER_SCALE"] if key == "train_large" else meta["config"]["TRAINER"]["LWEIB"]["ADAPTER_SCALE"]
    method, mapping = build_lweib(lweib_fixture, bank="descriptions_train", scale=scale)
    method.train()
    out = method.training_step(images, labels, step_info(labels))
    out.loss.backward()
    assert set(out.context.scales.values()) == {scale}
    close(f"lweib {key}/logits", out.logits, tensors[f"{key}/logits"])
    close(f"lweib {key}/loss", out.loss.reshape(1), tensors[f"{key}/loss"])
    check_grads(f"lweib {key}", f"{key}/grad/", tensors, method, mapping, weights)


def test_lweib_training_step_with_negative_sampling_equals_reference(lweib_fixture):
    """Negative sampling (ratio 7) active and taking every absent class: the loss, the positives'
    logits and the gradients do not depend on the (random) order of the negatives."""
    tensors, meta, bb, weights, _ = lweib_fixture
    images, labels = tensors["inputs/images"].float(), tensors["inputs/labels_neg"]
    method, mapping = build_lweib(lweib_fixture, bank="descriptions_train",
                                  neg_sampling_ratio=meta["config_train_neg"]["NEG_SAMPLING_RATIO"])
    method.train()
    out = method.training_step(images, labels, step_info(labels))
    out.loss.backward()
    assert torch.equal(out.labels, tensors["train_neg/remapped"])
    npos = tensors["train_neg/logits_pos"].shape[1]
    assert out.logits.shape[1] == npos + tensors["train_neg/logits_neg_sorted"].shape[1]
    close("lweib train_neg/logits_pos", out.logits[:, :npos], tensors["train_neg/logits_pos"])
    close("lweib train_neg/logits_neg_sorted", out.logits[:, npos:].sort(dim=1).values,
          tensors["train_neg/logits_neg_sorted"])
    close("lweib train_neg/loss", out.loss.reshape(1), tensors["train_neg/loss"])
    params = dict(method.named_parameters())
    for ref, name in mapping.items():
        g = params[name].grad.double()
        sumsq = tensors[f"train_neg/grad/{ref}#sumsq"]
        close(f"lweib train_neg/grad/{ref}#sumsq", (g ** 2).sum().reshape(1), sumsq)
        close(f"lweib train_neg/grad/{ref}#sum", g.sum().reshape(1), tensors[f"train_neg/grad/{ref}#sum"],
              scale=float((g.numel() * sumsq.double()).sqrt()))


# ------------------------------------------------------------------------------------ CoOp, CoCoOp
# benchmarks/parity_coop.py ran KaiyangZhou/CoOp's trainers/coop.py and trainers/cocoop.py (fp32).
# Their prompt learners' trainable parameters are named as vladapt's: ``ctx``, ``meta_net.linear{1,2}.*``.
COOP_RECORDS = ["coop", "coop_middle", "coop_front", "coop_n16", "coop_csc", "coop_csc_middle3"]


@pytest.fixture(scope="module")
def coop_fixture(tiny_fp16):
    tensors, meta = load_fixture("coop_tiny")
    return tensors, meta, fp16_backbone(meta, tiny_fp16)


def coop_settings(meta: dict, record: str) -> dict:
    """The reference's TRAINER.COOP / TRAINER.COCOOP settings of a record."""
    if record == "cocoop":
        return {"CLASS_TOKEN_POSITION": "end", "CSC": False, **meta["config_cocoop"]["TRAINER"]["COCOOP"]}
    if record == "coop":
        return meta["config_coop"]["TRAINER"]["COOP"]
    return meta["coop_variants"][record.removeprefix("coop_")]


def build_coop(coop_fixture, record: str, load: bool = True):
    """vladapt's CoOp / CoCoOp with the record's settings (everything else: vladapt's defaults), with the
    record's context (and meta-net weights) loaded unless ``load`` is False."""
    tensors, meta, bb = coop_fixture
    ref = coop_settings(meta, record)
    cfg = {"n_ctx": ref["N_CTX"], "ctx_init": ref["CTX_INIT"], "class_token_position": ref["CLASS_TOKEN_POSITION"],
           "csc": ref["CSC"]}
    method = create_method("cocoop" if record == "cocoop" else "coop", bb, meta["classnames"], cfg)
    if not load:
        return method, {}
    weights = {"ctx": tensors[f"{record}/ctx"]}
    meta_prefix = f"{record}/meta/"
    weights.update({k.removeprefix(meta_prefix): v for k, v in tensors.items() if k.startswith(meta_prefix)})
    load_mapped(method, weights, lambda ref_name: ref_name)  # same names; must cover every trainable parameter
    return method, weights


@pytest.mark.parametrize("record", COOP_RECORDS + ["cocoop"])
def test_coop_tokens_equal_reference(coop_fixture, record):
    """The reference tokenizes "<ctx words or X..X> {name}." and swaps the n context positions for the
    learned vectors; vladapt tokenizes "{name}." and inserts them after SOT: the same ids elsewhere."""
    tensors, meta, bb = coop_fixture
    method, _ = build_coop(coop_fixture, record, load=False)
    tokens, lengths = method.prompt_tokens()
    ref = tensors[f"{record}/tokens"].to(torch.int64)
    n = method.ctx.shape[-2]
    assert torch.equal(torch.cat([ref[:, :1], ref[:, 1 + n:]], dim=1), tokens[:, :ref.shape[1] - n].to(torch.int64))
    assert not tokens[:, ref.shape[1] - n:].any()
    assert torch.equal(lengths.to(torch.int64), tensors["coop/name_lens"].to(torch.int64))


@pytest.mark.parametrize("record", ["coop", "cocoop"])
def test_coop_initial_context_equals_reference(coop_fixture, record):
    """CTX_INIT "a photo of a": the context starts as the words' token embeddings, bit for bit."""
    tensors, meta, bb = coop_fixture
    method, _ = build_coop(coop_fixture, record, load=False)
    assert torch.equal(method.ctx.detach(), tensors[f"{record}/init_ctx"])


@pytest.mark.parametrize("record", COOP_RECORDS)
def test_coop_training_step_equals_reference(coop_fixture, record):
    """Logits, cross-entropy loss and the context's gradient of one step; eval logits equal the step's."""
    tensors, meta, bb = coop_fixture
    images, labels = tensors["inputs/images"].float(), tensors["inputs/labels"]
    method, _ = build_coop(coop_fixture, record)
    assert method.ctx.shape == tensors[f"{record}/grad/ctx"].shape
    method.train()
    out = method.training_step(images, labels, step_info(labels))
    out.loss.backward()
    close(f"{record}/logits", out.logits, tensors[f"{record}/logits"])
    close(f"{record}/loss", out.loss.reshape(1), tensors[f"{record}/loss"])
    close(f"{record}/grad/ctx", method.ctx.grad, tensors[f"{record}/grad/ctx"])
    method.eval()
    with torch.no_grad():
        close(f"{record}/logits (eval)", method(images), tensors[f"{record}/logits"])


def test_cocoop_eval_logits_equal_reference(coop_fixture):
    tensors, meta, bb = coop_fixture
    method, _ = build_coop(coop_fixture, "cocoop")
    method.eval()
    with torch.no_grad():
        close("cocoop/eval/logits", method(tensors["inputs/images"].float()), tensors["cocoop/eval/logits"])


def test_cocoop_training_step_equals_reference(coop_fixture):
    """The mean cross-entropy over the batch and the gradients of the context and of every meta-net
    tensor (the reference loops over the images; vladapt encodes the batch's prompts at once)."""
    tensors, meta, bb = coop_fixture
    images, labels = tensors["inputs/images"].float(), tensors["inputs/labels"]
    method, weights = build_coop(coop_fixture, "cocoop")
    assert set(weights) == {"ctx", "meta_net.linear1.weight", "meta_net.linear1.bias", "meta_net.linear2.weight",
                            "meta_net.linear2.bias"}
    method.train()
    out = method.training_step(images, labels, step_info(labels))
    out.loss.backward()
    close("cocoop/train/loss", out.loss.reshape(1), tensors["cocoop/train/loss"])
    # the reference's training pass returns only the loss; its logits are those of the eval pass
    close("cocoop/train/logits", out.logits, tensors["cocoop/eval/logits"])
    params = dict(method.named_parameters())
    for name in weights:
        assert params[name].grad is not None, f"no gradient reached {name}"
        close(f"cocoop/train/grad/{name}", params[name].grad, tensors[f"cocoop/train/grad/{name}"])
