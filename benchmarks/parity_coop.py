"""Record what the authors' released CoOp and CoCoOp code computes on a tiny CLIP (fixture for
tests/methods/test_parity.py).

    PYTHONPATH=src python benchmarks/parity_coop.py --checkout /path/to/CoOp \\
        --out tests/fixtures/parity/coop_tiny

``--checkout`` is a checkout of github.com/KaiyangZhou/CoOp (the fixture was made from commit
ff61507). Without it the script prints a message and exits with status 0.

What runs is the authors' code, imported from the checkout: their ``clip`` package (``build_model``,
tokenizer, ``load_clip_to_cpu``'s loading path), ``trainers/coop.py`` (``CoOp.build_model``,
``PromptLearner``, ``TextEncoder``, ``CustomCLIP``, ``forward_backward``) and ``trainers/cocoop.py``
(``CoCoOp.build_model``, its ``PromptLearner`` with the meta-net, ``CustomCLIP`` looping over the
images, ``forward_backward``), in fp32 (``PREC = "fp32"``: ``clip_model.float()``, no autocast,
meta-net left in fp32). Everything runs on CPU unchanged (``torch.cuda.device_count()`` is 0, so no
``DataParallel``). Nothing of their numerics is changed. Stand-ins, each as small as possible:

* ``dassl`` (the training framework) is replaced in ``sys.modules`` by empty modules and a stub
  ``TrainerX`` (``parity_common.StubTrainerX``) whose ``model_backward_and_update`` back-propagates
  without an optimizer step (CoOp's fp32 path calls it), so the gradients of one step can be read.
* ``dassl.optim.build_optimizer`` returns an optimizer stand-in (``NoStepOptimizer``) whose
  ``zero_grad`` clears the gradients and whose ``step`` does nothing: CoCoOp's fp32
  ``forward_backward`` calls ``optim.zero_grad(); loss.backward(); optim.step()`` itself, and the
  gradients must survive the step. ``build_lr_scheduler`` returns None (never called).
* ``dassl.metrics.compute_accuracy`` (CoOp's loss summary only; no effect on any recorded number)
  returns the top-1 accuracy in percent as Dassl's does.
* ``clip._download`` (network only) returns a local file: the tiny backbone's fp16 state dict,
  written with ``torch.save``; ``clip._MODELS`` gets an entry for its name.

The backbone is vladapt's ``vladapt-test-tiny`` (seed 0: ViT 32 px / patch 8, width 128, 2 + 2
blocks, QuickGELU, 2 heads per tower), exported with OpenAI's parameter names and rounded to fp16
(OpenAI's checkpoints are fp16; the reference trainers then call ``.float()``). ``INPUT.SIZE`` is 32
(their prompt learners assert it equals the backbone's input resolution).

The class names exercise the tokenization: underscores (replaced by spaces in both), several tokens
per name, digits (one token each), an apostrophe ("lady's" -> "lady", "'s") and a closing
parenthesis that merges with the prompt's final "." into one token (")."), so that the name's token
count alone differs from its count inside the prompt (what "middle" / "front" rely on).

Recorded (seed ``--seed``; every context and weight is stored in full, fp32, and loaded into their
model before anything is computed):

* ``inputs/images`` ``[B, 3, 32, 32]`` (fp16-exact), ``inputs/labels``.
* ``coop/*``: CoOp, ``CTX_INIT = "a photo of a"``, class token at the end (``vit_b16_ctxv1``-like):
  ``init_ctx`` (their initial context: the words' token embeddings), ``tokens`` (their tokenized
  prompts ``[C, 77]``), ``name_lens``; then ``ctx`` = init + 0.02 N(0, 1) (seeded), and one
  ``forward_backward`` with it: ``logits``, ``loss`` (cross-entropy), ``grad/ctx``.
* ``coop_<variant>/*``: CoOp with a random context (their ``nn.init.normal_(std=0.02)`` under
  ``torch.manual_seed``): ``ctx`` (the context loaded), ``tokens`` ("X X .. X {name}."), ``logits``,
  ``loss``, ``grad/ctx`` for the variants in :data:`COOP_VARIANTS` (N_CTX, CLASS_TOKEN_POSITION,
  CSC).
* ``cocoop/*``: CoCoOp (``vit_b16_c4_ep10_batch1_ctxv1``-like: N_CTX 4, CTX_INIT "a photo of a"):
  ``init_ctx``, ``tokens``; ``ctx`` = init + 0.02 N(0, 1) and ``meta/<their name>`` (the meta-net
  weights drawn by their constructor under ``torch.manual_seed``; PyTorch's default ``nn.Linear``
  init, biases non-zero); ``eval/logits`` (eval mode, ``model_inference``); ``train/loss`` and
  ``train/grad/<their name>`` for ``ctx`` and every meta-net tensor, from one ``forward_backward``
  on the whole batch (their ``CustomCLIP`` loops over the images and returns the mean cross-entropy).
"""

from __future__ import annotations

import importlib
import platform
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import parity_common as pc  # noqa: E402

CLASSNAMES = ["golden_retriever", "Boeing 747", "yellow_lady's_slipper", "tench_(fish)", "sunflower"]
LABELS = [0, 2, 3, 4]
CTX_INIT = "a photo of a"
NOISE = 0.02
# name -> (N_CTX, CLASS_TOKEN_POSITION, CSC), all with a random initialization (CTX_INIT "")
COOP_VARIANTS = {
    "middle": (4, "middle", False),
    "front": (4, "front", False),
    "n16": (16, "end", False),
    "csc": (4, "end", True),
    "csc_middle3": (3, "middle", True),
}


def coop_cfg(n_ctx: int = 4, ctx_init: str = CTX_INIT, position: str = "end", csc: bool = False) -> dict:
    return {
        "MODEL": {"BACKBONE": {"NAME": pc.TINY_NAME}, "INIT_WEIGHTS": ""},
        "INPUT": {"SIZE": [32, 32]},
        "OPTIM": {},
        "TRAINER": {"COOP": {"N_CTX": n_ctx, "CTX_INIT": ctx_init, "CSC": csc,
                             "CLASS_TOKEN_POSITION": position, "PREC": "fp32"}},
    }


def cocoop_cfg() -> dict:
    return {
        "MODEL": {"BACKBONE": {"NAME": pc.TINY_NAME}, "INIT_WEIGHTS": ""},
        "INPUT": {"SIZE": [32, 32]},
        "OPTIM": {},
        "TRAINER": {"COCOOP": {"N_CTX": 4, "CTX_INIT": CTX_INIT, "PREC": "fp32"}},
    }


class NoStepOptimizer:
    """Stands in for the optimizer of ``dassl.optim.build_optimizer``: ``zero_grad`` as torch's,
    ``step`` does nothing (the gradients of one step are what is recorded)."""

    def __init__(self, model, optim_cfg=None) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        pass


def compute_accuracy(output, target, topk=(1,)):
    """Dassl's top-1 accuracy in percent (only for CoOp's loss summary)."""
    return [(output.argmax(dim=1) == target).float().mean() * 100.0]


def stubs() -> dict[str, types.ModuleType]:
    optim = types.ModuleType("dassl.optim")
    optim.build_optimizer = NoStepOptimizer
    optim.build_lr_scheduler = lambda *args, **kwargs: None
    metrics = types.ModuleType("dassl.metrics")
    metrics.compute_accuracy = compute_accuracy
    return {"dassl.optim": optim, "dassl.metrics": metrics}


def learner_params(trainer) -> dict[str, torch.nn.Parameter]:
    """The prompt learner's trainable parameters under the reference's names (``ctx``, ``meta_net.*``)."""
    return {n: p for n, p in trainer.model.prompt_learner.named_parameters() if p.requires_grad}


def load_learner(trainer, weights: dict[str, torch.Tensor]) -> None:
    params = learner_params(trainer)
    if set(params) != set(weights):
        raise SystemExit(f"prompt learner parameter names differ: {sorted(set(params) ^ set(weights))}")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(weights[n])


def step(trainer, weights: dict[str, torch.Tensor], images: torch.Tensor, labels: torch.Tensor):
    """One ``forward_backward`` of the reference trainer in train mode -> (model output, {name: grad}).
    The output is CoOp's logits, or CoCoOp's loss (its ``CustomCLIP`` returns the loss in training)."""
    load_learner(trainer, weights)
    trainer.set_model_mode("train")
    seen = {}
    hook = trainer.model.register_forward_hook(lambda m, i, o: seen.update(out=o))
    try:
        trainer.forward_backward({"img": images, "label": labels})
    finally:
        hook.remove()
    return seen["out"].detach(), {n: p.grad.detach().clone() for n, p in learner_params(trainer).items()}


def main(argv: list[str] | None = None) -> int:
    args = pc.parse_args(argv, __doc__, "CoOp", "tests/fixtures/parity/coop_tiny")
    if args.checkout is None:
        print("parity_coop: no --checkout of the authors' CoOp code given; nothing to do (skipped).")
        return 0
    torch.set_num_threads(2)
    if args.batch != len(LABELS):
        raise SystemExit(f"--batch must be {len(LABELS)} (the labels are fixed)")

    coop, sd16, tmp = pc.load_reference(args.checkout, "coop", stubs())
    cocoop = importlib.import_module("trainers.cocoop")

    g = torch.Generator().manual_seed(args.seed + 2)
    images = torch.randn(args.batch, 3, 32, 32, generator=g).to(torch.float16)
    labels = torch.tensor(LABELS)
    tensors: dict[str, torch.Tensor] = {"inputs/images": images, "inputs/labels": labels}
    images = images.float()
    noise = torch.Generator().manual_seed(args.seed + 1)

    # ---- CoOp, "a photo of a", class token at the end
    torch.manual_seed(args.seed)
    trainer = pc.build_trainer(coop.CoOp, coop_cfg(), CLASSNAMES)
    pl = trainer.model.prompt_learner
    init = pl.ctx.detach().clone()
    ctx = init + NOISE * torch.randn(init.shape, generator=noise)
    logits, grads = step(trainer, {"ctx": ctx}, images, labels)
    tensors.update({"coop/init_ctx": init, "coop/tokens": pl.tokenized_prompts.to(torch.int32),
                    "coop/name_lens": torch.tensor(pl.name_lens, dtype=torch.int32), "coop/ctx": ctx,
                    "coop/logits": logits, "coop/loss": trainer.last_loss.reshape(1),
                    "coop/grad/ctx": grads["ctx"]})

    # ---- CoOp, random context: class token in the middle / at the front, 16 tokens, class-specific
    for i, (key, (n_ctx, position, csc)) in enumerate(COOP_VARIANTS.items()):
        torch.manual_seed(args.seed + 10 + i)
        trainer = pc.build_trainer(coop.CoOp, coop_cfg(n_ctx, "", position, csc), CLASSNAMES)
        pl = trainer.model.prompt_learner
        ctx = pl.ctx.detach().clone()
        assert ctx.shape == ((len(CLASSNAMES), n_ctx, ctx.shape[-1]) if csc else (n_ctx, ctx.shape[-1]))
        logits, grads = step(trainer, {"ctx": ctx}, images, labels)
        tensors.update({f"coop_{key}/ctx": ctx, f"coop_{key}/tokens": pl.tokenized_prompts.to(torch.int32),
                        f"coop_{key}/logits": logits, f"coop_{key}/loss": trainer.last_loss.reshape(1),
                        f"coop_{key}/grad/ctx": grads["ctx"]})

    # ---- CoCoOp: 4 tokens from "a photo of a" shifted per image by the meta-net
    torch.manual_seed(args.seed + 20)
    trainer = pc.build_trainer(cocoop.CoCoOp, cocoop_cfg(), CLASSNAMES)
    pl = trainer.model.prompt_learner
    weights = {n: p.detach().clone() for n, p in learner_params(trainer).items()}
    tensors["cocoop/init_ctx"] = weights["ctx"].clone()
    tensors["cocoop/tokens"] = pl.tokenized_prompts.to(torch.int32)
    weights["ctx"] = weights["ctx"] + NOISE * torch.randn(weights["ctx"].shape, generator=noise)
    tensors["cocoop/ctx"] = weights["ctx"]
    tensors.update({f"cocoop/meta/{n}": w for n, w in weights.items() if n != "ctx"})
    load_learner(trainer, weights)
    trainer.set_model_mode("eval")
    with torch.no_grad():
        tensors["cocoop/eval/logits"] = trainer.model_inference(images).detach()
    loss, grads = step(trainer, weights, images, labels)
    tensors["cocoop/train/loss"] = loss.reshape(1)
    tensors.update({f"cocoop/train/grad/{n}": gr for n, gr in grads.items()})

    meta = {
        "method": "coop, cocoop",
        "reference": {"repository": "github.com/KaiyangZhou/CoOp",
                      "commit": args.commit or pc.checkout_commit(args.checkout)},
        "backbone": {"name": pc.TINY_NAME, "seed": pc.TINY_SEED, "rounding": "fp16",
                     "fingerprint": pc.fingerprint(sd16)},
        "config_coop": coop_cfg(),
        "coop_variants": {k: {"N_CTX": n, "CTX_INIT": "", "CLASS_TOKEN_POSITION": p, "CSC": c}
                          for k, (n, p, c) in COOP_VARIANTS.items()},
        "config_cocoop": cocoop_cfg(),
        "classnames": CLASSNAMES,
        "context_noise": NOISE,
        "seed": args.seed,
        "stubs": "dassl: empty modules + parity_common.StubTrainerX; dassl.optim.build_optimizer: an optimizer "
                 "whose step does nothing; dassl.metrics.compute_accuracy: top-1 in percent",
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }
    st, js = pc.save_fixture(args.out, tensors, meta)
    print(f"wrote {st} ({st.stat().st_size / 1024:.0f} KiB) and {js} ({js.stat().st_size / 1024:.0f} KiB); "
          f"coop loss {float(tensors['coop/loss']):.6f}, cocoop loss {float(tensors['cocoop/train/loss']):.6f}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
