"""Record what the authors' released LwEIB code computes on a tiny CLIP (fixture for tests/methods/test_parity.py).

    PYTHONPATH=src python benchmarks/parity_lweib.py --checkout /path/to/VLM-LwEIB \\
        --out tests/fixtures/parity/lweib_tiny

``--checkout`` is a checkout of github.com/ZjjConan/VLM-LwEIB (the fixture was made from commit
af61e13). Without it the script prints a message and exits with status 0.

What runs is the authors' code, imported from the checkout: their ``clip`` package (``build_model``,
tokenizer, ``load_clip_to_cpu``'s loading path; byte-identical to HeBA's) and ``trainers/lweib.py``
(``LwEIB.build_model``, ``AdapterLearner``, ``CustomCLIP``, ``forward_backward``), in fp32
(``PREC = "fp32"``: ``clip_model.float()`` and no autocast). Nothing of their numerics is changed.
Stand-ins, each as small as possible:

* ``dassl`` (the training framework) is replaced in ``sys.modules`` by empty modules and a stub
  ``TrainerX`` (``parity_common.StubTrainerX``) whose ``model_backward_and_update`` back-propagates
  without an optimizer step, so the gradients of one step can be read.
* ``trainers.gpt3_prompts.load_CuPL_templates`` (the CuPL descriptions of the 11 datasets, keyed by
  Dassl's dataset name) returns a small description bank instead (stored in the fixture's JSON).
  The released code needs the same number of descriptions for every class: the ``train*`` records
  use one per class (``BANK_ONE``: the step's per-class description draw is then fixed), the
  ``eval*`` records three (``BANK``: the test-time average over descriptions, one of them longer
  than the 77-token context, so truncated).
* ``clip._download`` (network only) returns a local file: the tiny backbone's fp16 state dict,
  written with ``torch.save``; ``clip._MODELS`` gets an entry for its name.

The backbone is vladapt's ``vladapt-test-tiny`` (seed 0: ViT 32 px / patch 8, i.e. a 4 x 4 patch grid,
width 128, 2 + 2 blocks, QuickGELU, 2 heads per tower), exported with OpenAI's parameter names and
rounded to fp16 (OpenAI's checkpoints are fp16; the reference trainer then calls ``.float()``).

Configuration: LwEIB's base-to-new settings (scale 0.025, factor 2.5, prefix "a photo of a") with
adapters at both positions of both blocks of both towers (ADAPTER_START = 1, ADAPTER_END = 2: 15,360
adapter parameters, depthwise convolutions only).

Recorded (seed ``--seed``):

* ``adapter/<their name>``: the adapter weights, drawn by their constructors (PyTorch's default
  initialization) under ``torch.manual_seed(seed)``, quantized to int8 codes (exponents in the JSON;
  see ``parity_common``). These exact values are loaded into their model before anything is computed.
* ``inputs/images`` ``[B, 3, 32, 32]`` (fp16-exact), ``inputs/labels``, ``inputs/labels_neg``.
* ``tokens/descriptions``, ``tokens/one``: their tokenized prompt banks ``[C, T, 77]``.
* ``eval/logits``: test-time logits (scale = ADAPTER_SCALE, average over the three descriptions).
* ``eval_large/logits``: the same with ADAPTER_SCALE = 0.5 (adapter effects large in the logits).
* ``train/*``: one ``forward_backward`` with the randomness off through their config
  (SLOW_FAST_RATIO = 1.0: ``rand() > 1.0`` never holds, so every block uses the base scale;
  NEG_SAMPLING_RATIO = -1: all classes; one description per class): logits, loss and every adapter
  gradient (in full, or sketched for tensors above ``FULL_GRAD_MAX`` entries).
* ``train_large/*``: the same at ADAPTER_SCALE = 0.5.
* ``train_neg/*``: the same with NEG_SAMPLING_RATIO = 7 and 5 classes > batch 4, so negative
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
# Keys as a CuPL file may spell them: the released lookup lower-cases them and replaces "_" by " ".
BANK = {
    "golden_retriever": ["A golden retriever is a large dog with a dense golden coat.",
                         "It has feathered ears and a friendly face.",
                         "a dog retrieving a ball from a lake."],
    "boeing 747": ["a wide-body airliner with a hump on its upper deck.",
                   "A large passenger aircraft with four engines mounted under long swept wings, a long "
                   "fuselage with many windows, a raised cockpit above the nose, a tall tail fin, landing "
                   "gear with many wheels, and the livery of its airline painted along the side; it is often "
                   "photographed taking off, landing or parked at a busy international airport gate.",
                   "four engines under swept wings."],
    "Apple Pie": ["a baked dessert with a golden lattice crust.", "a slice of pie on a plate.",
                  "apples baked in pastry."],
    "tabby cat": ["a cat with a striped coat.", "a cat with an M-shaped marking on its forehead.",
                  "a small cat curled up asleep."],
    "Sunflower": ["a tall plant with a large yellow flower head.", "a field of sunflowers.",
                  "yellow petals around a brown centre of seeds."],
}
BANK_ONE = {k: v[:1] for k, v in BANK.items()}


def lweib_cfg(scale: float = 0.025, neg_ratio: int = -1) -> dict:
    return {
        "MODEL": {"BACKBONE": {"NAME": pc.TINY_NAME}, "INIT_WEIGHTS": ""},
        "INPUT": {"SIZE": [32, 32]},
        "DATASET": {"NAME": "ParityTiny"},
        "OPTIM": {},
        "TRAINER": {"LWEIB": {
            "PREC": "fp32",
            "TEXT_CTX_INIT": "a photo of a",
            "ADAPTER_START": 1,
            "ADAPTER_END": 2,
            "ADAPTER_SCALE": scale,
            "ADAPTER_SCALE_FACTOR": 2.5,
            "SLOW_FAST_RATIO": 1.0,
            "NEG_SAMPLING_RATIO": neg_ratio,
        }},
    }


def main(argv: list[str] | None = None) -> int:
    args = pc.parse_args(argv, __doc__, "VLM-LwEIB", "tests/fixtures/parity/lweib_tiny")
    if args.checkout is None:
        print("parity_lweib: no --checkout of the authors' VLM-LwEIB code given; nothing to do (skipped).")
        return 0
    torch.set_num_threads(2)
    if args.batch != len(LABELS):
        raise SystemExit(f"--batch must be {len(LABELS)} (the labels are fixed)")

    prompts_stub = type(sys)("trainers.gpt3_prompts")  # the per-dataset CuPL files, replaced by a small bank
    prompts_stub.BANK = {}
    prompts_stub.load_CuPL_templates = lambda dataset_name: dict(prompts_stub.BANK)
    lweib, sd16, tmp = pc.load_reference(args.checkout, "lweib", {"trainers.gpt3_prompts": prompts_stub})

    def build(cfg: dict, bank: dict):
        prompts_stub.BANK = bank
        return pc.build_trainer(lweib.LwEIB, cfg, CLASSNAMES)

    # ---- adapter weights: their init, quantized; loaded before every use
    torch.manual_seed(args.seed)
    first = build(lweib_cfg(), BANK)
    codes, exponents, weights = pc.draw_weights(first, args.seed + 1, lambda name: False)
    tensors: dict[str, torch.Tensor] = {f"adapter/{n}": c for n, c in codes.items()}
    num_params = sum(p.numel() for p in pc.trainable(first).values())

    g = torch.Generator().manual_seed(args.seed + 2)
    images = torch.randn(args.batch, 3, 32, 32, generator=g).to(torch.float16)
    labels = torch.tensor(LABELS)
    labels_neg = torch.tensor(LABELS_NEG)
    tensors.update({"inputs/images": images, "inputs/labels": labels, "inputs/labels_neg": labels_neg})
    images = images.float()

    # ---- eval: the average over three descriptions per class, at the base and at a large scale
    tensors["tokens/descriptions"] = first.model.adapter_learner.tk_prompts.to(torch.int32)
    tensors["eval/logits"] = pc.evaluate(first, weights, images)
    tensors["eval_large/logits"] = pc.evaluate(build(lweib_cfg(scale=0.5), BANK), weights, images)

    # ---- one training step with the randomness off (one description per class, all classes, slow scale)
    for key, scale in (("train", 0.025), ("train_large", 0.5)):
        trainer = build(lweib_cfg(scale=scale), BANK_ONE)
        tensors["tokens/one"] = trainer.model.adapter_learner.tk_prompts.to(torch.int32)
        (logits, remapped), loss, grads = pc.train_step(trainer, weights, images, labels)
        assert torch.equal(remapped, labels)
        tensors[f"{key}/logits"] = logits.detach()
        tensors[f"{key}/loss"] = loss.reshape(1)
        for n, gr in grads.items():
            tensors.update(pc.sketch_entries(f"{key}/grad/", n, gr))

    # ---- negative sampling active (ratio 7: every absent class drawn; their order is random)
    torch.manual_seed(args.seed + 3)
    (logits, remapped), loss, grads = pc.train_step(build(lweib_cfg(neg_ratio=7), BANK_ONE), weights, images,
                                                    labels_neg)
    logits = logits.detach()
    npos = len(torch.unique(labels_neg))
    tensors["train_neg/remapped"] = remapped
    tensors["train_neg/logits_pos"] = logits[:, :npos]
    tensors["train_neg/logits_neg_sorted"] = logits[:, npos:].sort(dim=1).values
    tensors["train_neg/loss"] = loss.reshape(1)
    for n, gr in grads.items():
        tensors[f"train_neg/grad/{n}#sum"] = gr.double().sum().float().reshape(1)
        tensors[f"train_neg/grad/{n}#sumsq"] = (gr.double() ** 2).sum().float().reshape(1)

    meta = {
        "method": "lweib",
        "reference": {"repository": "github.com/ZjjConan/VLM-LwEIB",
                      "commit": args.commit or pc.checkout_commit(args.checkout)},
        "backbone": {"name": pc.TINY_NAME, "seed": pc.TINY_SEED, "rounding": "fp16",
                     "fingerprint": pc.fingerprint(sd16)},
        "config": lweib_cfg(),
        "config_large": {"ADAPTER_SCALE": 0.5},
        "config_train_neg": {"NEG_SAMPLING_RATIO": 7},
        "classnames": CLASSNAMES,
        "descriptions": BANK,
        "descriptions_train": BANK_ONE,
        "seed": args.seed,
        "weight_exponents": exponents,
        "trainable_parameters": num_params,
        "sketch": {"full_grad_max": pc.FULL_GRAD_MAX, "stride": pc.SKETCH_STRIDE},
        "prompt_stub": "trainers.gpt3_prompts.load_CuPL_templates returns 'descriptions' (eval records) or "
                       "'descriptions_train' (train records)",
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }
    return pc.finish(args.out, tensors, meta, num_params, tmp)


if __name__ == "__main__":
    raise SystemExit(main())
