"""Shared pieces of the parity benchmarks (``parity_heba.py``, ``parity_mma.py``, ``parity_lweib.py``,
``parity_coop.py``) and of ``tests/methods/test_parity.py``.

The parity fixtures pin what the authors' released code computes on a tiny CLIP, so that vladapt's
re-implementation can be checked against it in the test suite without the authors' code:

* **Backbone**: vladapt's ``load_clip("vladapt-test-tiny")`` random weights (seed 0), every tensor
  rounded to fp16 (what OpenAI's checkpoints hold; the reference loader builds the model in fp16
  and the trainers call ``.float()``). The fixtures store only a fingerprint of these weights
  (:func:`fingerprint`), not the weights: the test rebuilds them and a changed tiny config fails
  loudly.
* **Adapter weights** are stored as int8 codes with one power-of-two step per tensor
  (:func:`quantize`; the values ``code * 2**exponent`` are exact in fp32), which keeps the
  fixtures small. The benchmarks load the dequantized values into the reference model before any
  computation, so both implementations see bit-identical weights.
* **Gradients** of small tensors are stored in full; of large ones (more than
  :data:`FULL_GRAD_MAX` entries) a sketch (:func:`grad_sketch`): the row sums, the column sums,
  every :data:`SKETCH_STRIDE`-th entry and the sum of squares of the 2-D view ``[shape[0], -1]``.

Only generic helpers live here: nothing of the authors' code is copied (the benchmarks import
it from a checkout given on the command line).
"""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

TINY_NAME = "vladapt-test-tiny"
TINY_SEED = 0
FULL_GRAD_MAX = 4096
SKETCH_STRIDE = 61
SKETCH_PARTS = ("rows", "cols", "sample", "sumsq")


# ----------------------------------------------------------------------------- backbone
def round_to_fp16_(model: torch.nn.Module) -> torch.nn.Module:
    """Round every parameter and buffer of ``model`` to the nearest fp16 value, in place (dtype kept)."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                t.copy_(t.to(torch.float16).to(t.dtype))
    return model


def fp16_state_dict(name: str, **load_kwargs) -> dict[str, Tensor]:
    """vladapt's backbone ``name`` (``load_clip(name, **load_kwargs)``) as an OpenAI-style fp16 state
    dict (vladapt's parameter names are OpenAI's; OpenAI's checkpoints are fp16)."""
    from vladapt.backbones import load_clip

    model = load_clip(name, **load_kwargs).model
    return {k: v.detach().to(torch.float16).clone() for k, v in model.state_dict().items()}


def tiny_fp16_state_dict() -> dict[str, Tensor]:
    """The tiny backbone of the parity fixtures as an fp16 state dict."""
    return fp16_state_dict(TINY_NAME, seed=TINY_SEED)


def fingerprint(state_dict: dict[str, Tensor]) -> str:
    """The full sha256 of vladapt's weights fingerprint (equal for an fp16 state dict and its fp32 copy)."""
    from vladapt.backbones import weights_fingerprint

    return weights_fingerprint(state_dict, digits=64)


def parse_args(argv: list[str] | None, doc: str, repo: str, default_out: str):
    """The command line both parity scripts share; ``args.checkout is None`` means: skip."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--checkout", type=Path, help=f"checkout of the authors' {repo} repository")
    ap.add_argument("--out", type=Path, default=Path(default_out),
                    help="output prefix: writes <out>.safetensors and <out>.json")
    ap.add_argument("--commit", help="the checkout's commit, recorded in the JSON (default: git rev-parse HEAD "
                    "of the checkout, if it is a git work tree)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=4)
    return ap.parse_args(argv)


# ----------------------------------------------------------------------------- weights
def quantize(t: Tensor) -> tuple[Tensor, int]:
    """``t`` -> (int8 codes, exponent) with ``codes * 2**exponent`` close to ``t`` (|code| <= 127)."""
    t = t.detach().float()
    peak = float(t.abs().max())
    exponent = math.ceil(math.log2(peak / 127.0)) if peak > 0 else 0
    codes = torch.round(t / 2.0 ** exponent).clamp_(-127, 127).to(torch.int8)
    return codes, exponent


def dequantize(codes: Tensor, exponent: int) -> Tensor:
    """Exact in fp32: an int8 code times a power of two."""
    return codes.to(torch.float32) * (2.0 ** exponent)


# ----------------------------------------------------------------------------- gradients
def grad_sketch(g: Tensor) -> dict[str, Tensor]:
    """``{"full": g}`` for small tensors, else the sketch of the 2-D view ``[shape[0], -1]``."""
    g = g.detach().float()
    if g.numel() <= FULL_GRAD_MAX:
        return {"full": g.clone()}
    m = g.reshape(g.shape[0], -1)
    return {
        "rows": m.sum(dim=1),
        "cols": m.sum(dim=0),
        "sample": m.flatten()[::SKETCH_STRIDE].clone(),
        "sumsq": (m.double() ** 2).sum().float().reshape(1),
    }


def sketch_entries(prefix: str, name: str, g: Tensor) -> dict[str, Tensor]:
    """Fixture entries ``{prefix}{name}#{part}`` of :func:`grad_sketch`."""
    return {f"{prefix}{name}#{part}": v for part, v in grad_sketch(g).items()}


# ----------------------------------------------------------------------------- reference code
class _Registry:
    def register(self, *args, **kwargs):
        return lambda cls: cls


class StubTrainerX:
    """Stands in for Dassl's ``TrainerX`` (the training framework, not part of the methods).

    Only what the reference trainers call is provided. ``model_backward_and_update`` zeroes the
    gradients and back-propagates but does **not** step the optimizer (there is none), so the
    gradients of one training step can be read afterwards; the loss it received is kept in
    ``last_loss``. ``set_model_mode`` / ``model_inference`` behave as Dassl's.
    """

    def __init__(self, cfg: Any, classnames: list[str]) -> None:
        self.cfg = cfg
        self.dm = types.SimpleNamespace(dataset=types.SimpleNamespace(classnames=list(classnames)))
        self.device = torch.device("cpu")
        self._models: dict[str, torch.nn.Module] = {}
        self.batch_idx = 0
        self.num_batches = 1 << 30  # never the last batch: no lr update
        self.last_loss: Tensor | None = None

    def register_model(self, name="model", model=None, optim=None, sched=None):
        self._models[name] = model

    def get_model_names(self, names=None):
        return list(self._models)

    def set_model_mode(self, mode="train", names=None):
        for m in self._models.values():
            m.train() if mode == "train" else m.eval()

    def model_backward_and_update(self, loss, names=None):
        for m in self._models.values():
            m.zero_grad(set_to_none=True)
        loss.backward()
        self.last_loss = loss.detach()

    def update_lr(self, names=None):
        pass

    def model_inference(self, input):
        return self.model(input)


def install_framework_stubs() -> None:
    """Empty stand-ins for the ``dassl`` imports of the reference trainers."""
    def module(name: str, **attrs) -> types.ModuleType:
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        sys.modules[name] = m
        return m

    def unused(*args, **kwargs):
        return None

    module("dassl")
    module("dassl.engine", TRAINER_REGISTRY=_Registry(), TrainerX=StubTrainerX)
    module("dassl.utils", load_pretrained_weights=unused, load_checkpoint=unused)
    module("dassl.optim", build_optimizer=unused, build_lr_scheduler=unused)


def prepare_checkout(checkout: Path) -> None:
    """Make the checkout's ``clip`` and ``trainers`` packages importable (first on ``sys.path``)."""
    checkout = Path(checkout).resolve()
    if not (checkout / "clip" / "model.py").is_file() or not (checkout / "trainers").is_dir():
        raise SystemExit(f"{checkout} does not look like the reference checkout (no clip/model.py, trainers/)")
    for name in [m for m in sys.modules if m in ("clip", "trainers") or m.startswith(("clip.", "trainers."))]:
        del sys.modules[name]
    sys.path.insert(0, str(checkout))
    install_framework_stubs()


def point_loader_at(clip_module: types.ModuleType, backbone_name: str, weights_file: Path) -> None:
    """Let the reference ``load_clip_to_cpu`` read a local weights file for ``backbone_name``: its
    URL table gets an entry and its downloader (``clip._download``, network only) returns the file."""
    clip_module._MODELS[backbone_name] = f"local://{weights_file.name}"
    clip_module._download = lambda url, root=None: str(weights_file)


def checkout_commit(checkout: Path) -> str | None:
    """The checkout's git commit if it is the top of a git work tree, else None (e.g. an archive export)."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(checkout), *args], capture_output=True, text=True,
                              check=True).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != Path(checkout).resolve():
            return None  # inside some other repository
        return git("rev-parse", "HEAD")
    except (OSError, subprocess.CalledProcessError):
        return None


def ns(d: dict) -> types.SimpleNamespace:
    """Nested attribute access for a dict (a stand-in for the reference's yacs config)."""
    return types.SimpleNamespace(**{k: ns(v) if isinstance(v, dict) else v for k, v in d.items()})


def load_reference(checkout: Path, trainer_module: str, stubs: dict[str, types.ModuleType] | None = None,
                   state_dict: dict[str, Tensor] | None = None, backbone_name: str = TINY_NAME):
    """Import ``trainers.<trainer_module>`` from the checkout with the framework stubs (plus ``stubs``,
    e.g. a replacement for a module of the checkout that does not import) and point the reference
    loader's ``backbone_name`` at ``state_dict`` (default: the tiny backbone's fp16 weights).
    Returns ``(trainer module, fp16 state dict, tmp dir)``; keep the temporary directory alive
    while the reference runs."""
    import importlib
    import tempfile

    prepare_checkout(checkout)
    sys.modules.update(stubs or {})
    clip = importlib.import_module("clip.clip")
    module = importlib.import_module(f"trainers.{trainer_module}")
    sd16 = tiny_fp16_state_dict() if state_dict is None else state_dict
    tmp = tempfile.TemporaryDirectory()
    weights_file = Path(tmp.name) / "backbone_fp16.pt"
    torch.save(sd16, weights_file)
    point_loader_at(clip, backbone_name, weights_file)
    return module, sd16, tmp


def build_trainer(trainer_cls: type, cfg: dict, classnames: list[str]):
    """The reference trainer's ``build_model`` (their CLIP loading, ``.float()``, freezing), quietly."""
    import contextlib
    import io

    trainer = trainer_cls(ns(cfg), classnames)
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.build_model()
    return trainer


def trainable(trainer) -> dict[str, torch.nn.Parameter]:
    """The adapter learner's trainable parameters under the reference's names."""
    return {n: p for n, p in trainer.model.adapter_learner.named_parameters() if p.requires_grad}


def draw_weights(trainer, seed: int, perturb: Callable[[str], bool], noise: float = 0.1):
    """The reference's freshly initialized adapter weights, with the tensors selected by
    ``perturb(name)`` replaced by ``init + noise * N(0, 1)`` (to make e.g. zero biases or unit
    LayerNorm gains observable), quantized. Returns ``(codes, exponents, exact fp32 weights)``."""
    g = torch.Generator().manual_seed(seed)
    codes, exponents, weights = {}, {}, {}
    for name, p in trainable(trainer).items():
        w = p.detach().clone()
        if perturb(name):
            w = w + noise * torch.randn(w.shape, generator=g)
        codes[name], exponents[name] = quantize(w)
        weights[name] = dequantize(codes[name], exponents[name])
    return codes, exponents, weights


def load_weights(trainer, weights: dict[str, Tensor]) -> None:
    params = trainable(trainer)
    if set(params) != set(weights):
        raise SystemExit(f"adapter parameter names differ: {sorted(set(params) ^ set(weights))}")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(weights[n])


def evaluate(trainer, weights: dict[str, Tensor], images: Tensor) -> Tensor:
    """Test-time logits as Dassl's ``test()`` computes them (eval mode, no grad)."""
    load_weights(trainer, weights)
    trainer.set_model_mode("eval")
    with torch.no_grad():
        return trainer.model_inference(images).detach()


def train_step(trainer, weights: dict[str, Tensor], images: Tensor, labels: Tensor):
    """One ``forward_backward`` of the reference trainer (train mode as Dassl's ``run_epoch`` sets it).
    Returns ``(model output, loss, {name: gradient})``."""
    load_weights(trainer, weights)
    trainer.set_model_mode("train")
    seen = {}
    hook = trainer.model.register_forward_hook(lambda m, i, o: seen.update(out=o))
    try:
        trainer.forward_backward({"img": images, "label": labels})
    finally:
        hook.remove()
    grads = {n: p.grad.detach().clone() for n, p in trainable(trainer).items()}
    return seen["out"], trainer.last_loss, grads


def save_fixture(out: Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``<out>.safetensors`` and ``<out>.json``; returns both paths."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.suffix in (".safetensors", ".json", ".*"):
        out = out.with_suffix("")
    out.parent.mkdir(parents=True, exist_ok=True)
    st, js = out.with_name(out.name + ".safetensors"), out.with_name(out.name + ".json")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(st))
    js.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return st, js


def finish(out, tensors: dict, meta: dict, num_params: int, tmp) -> int:
    """Write the fixture, print what was written and clean up the temporary checkout files."""
    st, js = save_fixture(out, tensors, meta)
    print(f"wrote {st} ({st.stat().st_size / 1024:.0f} KiB) and {js} ({js.stat().st_size / 1024:.0f} KiB); "
          f"loss {float(tensors['train/loss']):.6f}, {num_params} trainable parameters")
    tmp.cleanup()
    return 0
