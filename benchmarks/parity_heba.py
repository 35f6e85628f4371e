"""Record what the authors' released HeBA code computes on a tiny CLIP (fixture for tests/methods/test_parity.py).

    PYTHONPATH=src python benchmarks/parity_heba.py --checkout /path/to/VLM-HeBA \\
        --out tests/fixtures/parity/heba_tiny

``--checkout`` is a checkout of github.com/Jahid12012021/VLM-HeBA (the fixture was made from commit
60ecf23). Without it the script prints a message and exits with status 0.

What runs is the authors' code, imported from the checkout: their ``clip`` package (``build_model``,
tokenizer, ``load_clip_to_cpu``'s loading path) and ``trainers/heba.py`` (``HeBA.build_model``,
``CustomCLIP``, ``forward_backward``, ``LabelSmoothingCrossEntropy``), in fp32 (``PREC = "fp32"``,
i.e. ``clip_model.float()`` and no autocast). Nothing of their numerics is changed. Stand-ins, each
as small as possible:

* ``dassl`` (the training framework) is replaced in ``sys.modules`` by empty modules and a stub
  ``TrainerX`` (``parity_common.StubTrainerX``) whose ``model_backward_and_update`` back-propagates
  without an optimizer step, so the gradients of one step can be read.
* ``trainers/gpt3_prompts.py`` of the release does not import (METHODS.md §1.13 defect 1: an
  identifier broken across a line); its ``load_CuPL_templates`` is replaced by a function returning
  ``{}``, which is what the released loader returns once its syntax is fixed (§1.13 defect 2: every
  per-dataset import fails), so every class gets the single fallback prompt
  ``"a photo of a {c}, a photo of a {c}."``. For the ``eval_desc`` record it returns a small
  description bank instead (the bank is stored in the fixture's JSON).
* ``clip._download`` (network only) returns a local file: the tiny backbone's fp16 state dict,
  written with ``torch.save``; ``clip._MODELS`` gets an entry for its name.

The backbone is vladapt's ``vladapt-test-tiny`` (seed 0: ViT 32 px / patch 8, width 128, 2 + 2
blocks, QuickGELU, 2 heads per tower), exported with OpenAI's parameter names and rounded to fp16
(OpenAI's checkpoints are fp16; the reference trainer then calls ``.float()``).

Configuration: HeBA's base-to-new settings (scale 0.025, factor 2.25, reduction 4, label smoothing
0.1, prefix "a photo of a") with adapters at both positions of block 1 of both towers
(ADAPTER_START = ADAPTER_END = 1: one adapted block keeps the fixture small, ~0.28 M adapter
parameters; the frozen block 2 after it makes the gradients pass back through a whole frozen block).

Recorded (seed ``--seed``):

* ``adapter/<their name>``: the adapter weights, drawn by their constructors under
  ``torch.manual_seed(seed)``, with the LayerNorm affine parameters perturbed
  (gamma = 1 + 0.1 N(0,1), beta = 0.1 N(0,1); their init is 1 / 0, which would hide a missing affine),
  then quantized to int8 codes (exponents in the JSON; see ``parity_common``). These exact values
  are loaded into their model before anything is computed.
* ``inputs/images`` ``[B, 3, 32, 32]`` (fp16-exact), ``inputs/labels``, ``inputs/labels_neg``.
* ``tokens/reference``, ``tokens/descriptions``: their tokenized prompt banks ``[C, T, 77]``.
* ``eval/logits``: test-time logits (scale = ADAPTER_SCALE_BASE, template average).
* ``eval_large/logits``: the same with ADAPTER_SCALE_BASE = 0.5 (adapter effects large in the logits).
* ``eval_desc/logits``: with the description bank (template averaging over T > 1, padding,
  truncation of a long prompt, the fallback prompt of a class without descriptions).
* ``train/*``: one ``forward_backward`` with the randomness off through their config
  (SLOW_FAST_RATIO = 1.0: ``rand() > 1.0`` never holds, so every block uses the base scale;
  NEG_SAMPLING_RATIO = -1: all classes; one prompt per class): logits, loss and every adapter
  gradient (in full, or sketched for tensors above ``FULL_GRAD_MAX`` entries).
* ``train_neg/*``: the same with NEG_SAMPLING_RATIO = 5 and 5 classes > batch 4, so negative
  sampling is active and takes every absent class (in a random order): the loss and the gradients
  do not depend on that order; stored: the loss, the logits of the positive classes, the sorted
  logits of the negatives and per-gradient sums / sums of squares.
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
LABELS_NEG = [3, 1, 3, 0]
DESCRIPTIONS = {
    "golden_retriever": ["A golden retriever is a large dog with a dense golden coat.",
                         "It has feathered ears and a friendly face."],
    "boeing 747": ["a wide-body airliner with a hump on its upper deck.",
                   "A large passenger aircraft with four engines mounted under long swept wings, a long "
                   "fuselage with many windows, a raised cockpit above the nose, a tall tail fin, landing "
                   "gear with many wheels, and the livery of its airline painted along the side; it is often "
                   "photographed taking off, landing or parked at a busy international airport gate.",
                   "four engines under swept wings."],
    "Apple Pie": ["a baked dessert with a golden lattice crust."],
    "tabby cat": ["a cat with a striped coat.", "a cat with an M-shaped marking on its forehead.",
                  "a small cat curled up asleep."],
}


def heba_cfg(scale: float = 0.025, neg_ratio: int = -1) -> dict:
    return {
        "MODEL": {"BACKBONE": {"NAME": pc.TINY_NAME}, "INIT_WEIGHTS": ""},
        "INPUT": {"SIZE": [32, 32]},
        "DATASET": {"NAME": "ParityTiny"},
        "OPTIM": {},
        "TRAINER": {"HeBA": {
            "PREC": "fp32",
            "ADAPTER_START": 1,
            "ADAPTER_END": 1,
            "ADAPTER_SCALE_BASE": scale,
            "ADAPTER_SCALE_NOVEL": 0.010,
            "ADAPTER_SCALE_FACTOR": 2.25,
            "SLOW_FAST_RATIO": 1.0,
            "NEG_SAMPLING_RATIO": neg_ratio,
            "TEXT_CTX_INIT": "a photo of a",
        }},
    }


def main(argv: list[str] | None = None) -> int:
    args = pc.parse_args(argv, __doc__, "VLM-HeBA", "tests/fixtures/parity/heba_tiny")
    if args.checkout is None:
        print("parity_heba: no --checkout of the authors' VLM-HeBA code given; nothing to do (skipped).")
        return 0
    torch.set_num_threads(2)
    if args.batch != len(LABELS):
        raise SystemExit(f"--batch must be {len(LABELS)} (the labels are fixed)")

    prompts_stub = type(sys)("trainers.gpt3_prompts")  # the released module does not import (see above)
    prompts_stub.BANK = {}
    prompts_stub.load_CuPL_templates = lambda dataset_name: dict(prompts_stub.BANK)
    heba, sd16, tmp = pc.load_reference(args.checkout, "heba", {"trainers.gpt3_prompts": prompts_stub})

    def build(cfg: dict, bank: dict | None = None):
        prompts_stub.BANK = bank or {}
        return pc.build_trainer(heba.HeBA, cfg, CLASSNAMES)

    # ---- adapter weights: their init (LN affine perturbed), quantized; loaded before every use
    torch.manual_seed(args.seed)
    first = build(heba_cfg())
    codes, exponents, weights = pc.draw_weights(first, args.seed + 1, lambda name: ".norm." in name)
    tensors: dict[str, torch.Tensor] = {f"adapter/{n}": c for n, c in codes.items()}
    num_params = sum(p.numel() for p in pc.trainable(first).values())

    g = torch.Generator().manual_seed(args.seed + 2)
    images = torch.randn(args.batch, 3, 32, 32, generator=g).to(torch.float16)
    labels = torch.tensor(LABELS)
    labels_neg = torch.tensor(LABELS_NEG)
    tensors.update({"inputs/images": images, "inputs/labels": labels, "inputs/labels_neg": labels_neg})
    images = images.float()

    # ---- eval (released prompts) and one training step with the randomness off
    tensors["tokens/reference"] = first.model.adapter_learner.tk_prompts.to(torch.int32)
    tensors["eval/logits"] = pc.evaluate(first, weights, images)
    (logits, remapped), loss, grads = pc.train_step(build(heba_cfg()), weights, images, labels)
    assert torch.equal(remapped, labels)
    tensors["train/logits"] = logits.detach()
    tensors["train/loss"] = loss.reshape(1)
    for n, gr in grads.items():
        tensors.update(pc.sketch_entries("train/grad/", n, gr))

    # ---- negative sampling active (every absent class drawn; their order is random)
    torch.manual_seed(args.seed + 3)
    (logits, remapped), loss, grads = pc.train_step(build(heba_cfg(neg_ratio=5)), weights, images, labels_neg)
    logits = logits.detach()
    npos = len(torch.unique(labels_neg))
    tensors["train_neg/remapped"] = remapped
    tensors["train_neg/logits_pos"] = logits[:, :npos]
    tensors["train_neg/logits_neg_sorted"] = logits[:, npos:].sort(dim=1).values
    tensors["train_neg/loss"] = loss.reshape(1)
    for n, gr in grads.items():
        tensors[f"train_neg/grad/{n}#sum"] = gr.double().sum().float().reshape(1)
        tensors[f"train_neg/grad/{n}#sumsq"] = (gr.double() ** 2).sum().float().reshape(1)

    # ---- larger scale; description bank
    tensors["eval_large/logits"] = pc.evaluate(build(heba_cfg(scale=0.5)), weights, images)
    desc = build(heba_cfg(), DESCRIPTIONS)
    tensors["tokens/descriptions"] = desc.model.adapter_learner.tk_prompts.to(torch.int32)
    tensors["eval_desc/logits"] = pc.evaluate(desc, weights, images)

    meta = {
        "method": "heba",
        "reference": {"repository": "github.com/Jahid12012021/VLM-HeBA",
                      "commit": args.commit or pc.checkout_commit(args.checkout)},
        "backbone": {"name": pc.TINY_NAME, "seed": pc.TINY_SEED, "rounding": "fp16",
                     "fingerprint": pc.fingerprint(sd16)},
        "config": heba_cfg(),
        "config_eval_large": {"ADAPTER_SCALE_BASE": 0.5},
        "config_train_neg": {"NEG_SAMPLING_RATIO": 5},
        "classnames": CLASSNAMES,
        "descriptions": DESCRIPTIONS,
        "seed": args.seed,
        "weight_exponents": exponents,
        "trainable_parameters": num_params,
        "sketch": {"full_grad_max": pc.FULL_GRAD_MAX, "stride": pc.SKETCH_STRIDE},
        "prompt_stub": "trainers.gpt3_prompts.load_CuPL_templates returns {} (released behaviour, §1.13) "
                       "except for eval_desc, where it returns 'descriptions'",
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }
    return pc.finish(args.out, tensors, meta, num_params, tmp)


if __name__ == "__main__":
    raise SystemExit(main())
