"""Record what the authors' released MMA code computes on a tiny CLIP (fixture for tests/methods/test_parity.py).

    PYTHONPATH=src python benchmarks/parity_mma.py --checkout /path/to/Multi-Modal-Adapter \\
        --out tests/fixtures/parity/mma_tiny

``--checkout`` is a checkout of the MMA authors' repository (github.com/ZjjConan/Multi-Modal-Adapter,
"VLM-MultiModalAdapter"; the fixture was made from commit 547ee34). Without it the script prints a
message and exits with status 0.

What runs is the authors' code, imported from the checkout: their ``clip`` package (``build_model``
with its adapter-aware ``ModifiedResidualAttentionBlock``, tokenizer, ``load_clip_to_cpu``'s loading
path) and ``trainers/mmadapter.py`` (``MultiModalAdapter.build_model``, ``CustomCLIP``,
``forward_backward`` with plain cross-entropy), in fp32 (``PREC = "fp32"``: ``clip_model.float()``,
no autocast). Nothing of their numerics is changed. Stand-ins, each as small as possible:

* ``dassl`` (the training framework) is replaced in ``sys.modules`` by empty modules and a stub
  ``TrainerX`` (``parity_common.StubTrainerX``) whose ``model_backward_and_update`` back-propagates
  without an optimizer step, so the gradients of one step can be read.
* ``clip._download`` (network only) returns a local file: the tiny backbone's fp16 state dict,
  written with ``torch.save``; ``clip._MODELS`` gets an entry for its name.

The backbone is vladapt's ``vladapt-test-tiny`` (seed 0: ViT 32 px / patch 8, width 128, 2 + 2
blocks, QuickGELU), exported with OpenAI's parameter names and rounded to fp16.

Configuration: adapters on blocks 1..2 of both towers (ADAPTER_START = 1, ADAPTER_END = 2; the
shared 32 x 32 layer per block), ADAPTER_DIM = 32, ADAPTER_SCALE = 0.001, prompt
"a photo of a {class}.". MMA has no randomness in its forward pass.

Recorded (seed ``--seed``):

* ``adapter/<their name>``: the adapter weights drawn by their constructors under
  ``torch.manual_seed(seed)`` (Kaiming-normal fan_out), with the biases (zero in their init, which
  would hide a missing bias) set to 0.1 N(0, 1), quantized to int8 codes (exponents in the JSON; see
  ``parity_common``). These exact values are loaded into their model before anything is computed.
* ``inputs/images`` ``[B, 3, 32, 32]`` (fp16-exact), ``inputs/labels``.
* ``tokens/prompts``: their tokenized prompts ``[C, 77]``.
* ``eval/logits`` (ADAPTER_SCALE = 0.001) and ``eval_large/logits`` (ADAPTER_SCALE = 0.5, so that
  the adapters' effect on the logits is large).
* ``train/*``: one ``forward_backward``: logits, cross-entropy loss and every adapter gradient
  (all in full: the largest adapter tensor has 4,224 entries).
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import parity_common as pc  # noqa: E402

CLASSNAMES = ["golden_retriever", "Boeing 747", "apple pie", "tabby cat", "sunflower"]
LABELS = [0, 2, 2, 4]


def mma_cfg(scale: float = 0.001) -> dict:
    return {
        "MODEL": {"BACKBONE": {"NAME": pc.TINY_NAME}, "INIT_WEIGHTS": ""},
        "INPUT": {"SIZE": [32, 32]},
        "DATASET": {"NAME": "ParityTiny"},
        "OPTIM": {},
        "TRAINER": {"MMADAPTER": {
            "PREC": "fp32",
            "TEXT_CTX_INIT": "a photo of a",
            "ADAPTER_START": 1,
            "ADAPTER_END": 2,
            "ADAPTER_DIM": 32,
            "ADAPTER_SCALE": scale,
        }},
    }


def main(argv: list[str] | None = None) -> int:
    args = pc.parse_args(argv, __doc__, "Multi-Modal-Adapter", "tests/fixtures/parity/mma_tiny")
    if args.checkout is None:
        print("parity_mma: no --checkout of the authors' Multi-Modal-Adapter code given; nothing to do (skipped).")
        return 0
    torch.set_num_threads(2)
    if args.batch != len(LABELS):
        raise SystemExit(f"--batch must be {len(LABELS)} (the labels are fixed)")

    mma, sd16, tmp = pc.load_reference(args.checkout, "mmadapter")

    def build(cfg: dict):
        return pc.build_trainer(mma.MultiModalAdapter, cfg, CLASSNAMES)

    torch.manual_seed(args.seed)
    first = build(mma_cfg())
    codes, exponents, weights = pc.draw_weights(first, args.seed + 1, lambda name: name.endswith(".bias"))
    tensors: dict[str, torch.Tensor] = {f"adapter/{n}": c for n, c in codes.items()}
    num_params = sum(p.numel() for p in pc.trainable(first).values())

    g = torch.Generator().manual_seed(args.seed + 2)
    images = torch.randn(args.batch, 3, 32, 32, generator=g).to(torch.float16)
    labels = torch.tensor(LABELS)
    tensors.update({"inputs/images": images, "inputs/labels": labels})
    images = images.float()

    tensors["tokens/prompts"] = first.model.adapter_learner.tokenized_prompts.to(torch.int32)
    tensors["eval/logits"] = pc.evaluate(first, weights, images)
    logits, loss, grads = pc.train_step(build(mma_cfg()), weights, images, labels)
    tensors["train/logits"] = logits.detach()
    tensors["train/loss"] = loss.reshape(1)
    for n, gr in grads.items():
        tensors.update(pc.sketch_entries("train/grad/", n, gr))
    tensors["eval_large/logits"] = pc.evaluate(build(mma_cfg(scale=0.5)), weights, images)

    meta = {
        "method": "mma",
        "reference": {"repository": "github.com/ZjjConan/Multi-Modal-Adapter",
                      "commit": args.commit or pc.checkout_commit(args.checkout)},
        "backbone": {"name": pc.TINY_NAME, "seed": pc.TINY_SEED, "rounding": "fp16",
                     "fingerprint": pc.fingerprint(sd16)},
        "config": mma_cfg(),
        "config_eval_large": {"ADAPTER_SCALE": 0.5},
        "classnames": CLASSNAMES,
        "seed": args.seed,
        "weight_exponents": exponents,
        "trainable_parameters": num_params,
        "sketch": {"full_grad_max": pc.FULL_GRAD_MAX, "stride": pc.SKETCH_STRIDE},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }
    return pc.finish(args.out, tensors, meta, num_params, tmp)


if __name__ == "__main__":
    raise SystemExit(main())
