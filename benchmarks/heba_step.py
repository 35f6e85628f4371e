"""HeBA's training step on ViT-B/16 (random weights): the released reference code vs vladapt, side by side.

    python benchmarks/heba_step.py [--reference CHECKOUT] [--steps 3] [--batch 16] [--classes 50]
                                   [--threads N] [--bf16] [--profile]

Setting: a batch of ``--batch`` images of different classes out of ``--classes``; negative sampling
(ratio 5) puts all classes into the step's text batch; adapters at both positions of all 12 blocks
of both towers (HeBA's base-to-new configuration). Each column runs in its own process, so that
peak RSS is measured per configuration:

* ``reference``: the authors' released trainer (github.com/Jahid12012021/VLM-HeBA), imported from
  ``--reference CHECKOUT`` and run in fp32 as ``parity_heba.py`` runs it (Dassl replaced by stubs,
  the same random ViT-B/16 weights); skipped with a message when no checkout is given;
* ``vladapt fp32``, and ``vladapt auto`` (the precision ``precision: auto`` picks on this machine,
  :mod:`vladapt.engine.precision`; when that is fp32 the fp32 column stands for it), each in a
  process set up as the ``vladapt`` command sets up its own (:mod:`vladapt.host_memory`:
  freed activation blocks are reused; ``VLADAPT_TUNE_MALLOC=0`` measures without that);
* ``vladapt bf16`` with ``--bf16`` (on a CPU without native bf16 instructions this is very slow).

Printed per column: seconds per step (best of ``--steps`` after a warm-up), images/s, speed-up
over the reference, the FLOPs of one step (counted with ``torch.utils.flop_counter`` after the
timing, with a formula for grouped-convolution gradients that counts their real work), the
achieved GFLOP/s and its fraction of this CPU's matmul peak (measured in its own process in the
same run), and peak RSS (of the warm-up and timed steps). ``--profile`` adds the top-10 operators
of each vladapt column's step (``torch.profiler``, by self CPU time), the matrix products' share of
that step and the GFLOP/s they reach in it.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from perf_common import best_time, counted_gflop, matmul_peak  # noqa: E402


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # KiB -> GiB


# --------------------------------------------------------------------------- children
def child_vladapt(precision: str, steps: int, batch: int, classes: int, threads: int, profile: bool) -> dict:
    from vladapt.backbones import load_clip
    from vladapt.host_memory import reuse_freed_memory
    from vladapt.engine.precision import precision_dtype
    from vladapt.engine.runconfig import resolve_run_config
    from vladapt.engine.train import StepInfo, autocast_context, build_optimizer
    from vladapt.methods import create_method

    reuse_freed_memory()  # as the vladapt command does (VLADAPT_TUNE_MALLOC=0 measures without it)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    bb = load_clip("ViT-B-16-quickgelu", dtype=precision_dtype(precision))
    heba = create_method("heba", bb, [f"class number {i}" for i in range(classes)])
    _, train_cfg = resolve_run_config("heba", "base2new")
    params = [p for p in heba.parameters() if p.requires_grad]
    opt = build_optimizer(train_cfg, params)
    images = torch.randn(batch, 3, 224, 224)
    labels = torch.arange(batch) % classes
    seen = {}

    def step():  # what the engine's fit does per step
        info = StepInfo(0, 0, torch.Generator().manual_seed(0), labels, slice(0, batch), batch)
        opt.zero_grad(set_to_none=True)
        with autocast_context(precision, "cpu"):
            out = heba.training_step(images, labels, info)
        if not torch.isfinite(out.loss.detach()):
            raise SystemExit("non-finite loss")
        out.loss.backward()
        opt.step()
        seen["classes"] = out.logits.shape[1]

    heba.train()
    step()  # warm-up
    t = best_time(step, steps)
    rss = _rss_gib()  # before the FLOP counter and the profiler add their own memory
    res = {"name": f"vladapt {precision}", "seconds": t, "gflop": counted_gflop(step), "peak_rss_gib": rss,
           "classes_in_step": seen["classes"], "trainable_parameters": heba.num_trainable_parameters(),
           "threads": torch.get_num_threads()}
    if profile:
        from torch.profiler import ProfilerActivity, profile as prof

        with prof(activities=[ProfilerActivity.CPU]) as p:
            step()
        ops = p.key_averages()
        res["profile"] = ops.table(sort_by="self_cpu_time_total", row_limit=10)
        # the matrix products' share of the profiled step (self time, microseconds)
        res["matmul_share"] = (sum(e.self_cpu_time_total for e in ops if e.key in MATMUL_OPS)
                               / sum(e.self_cpu_time_total for e in ops))
    return res


MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}


def child_reference(checkout: str, steps: int, batch: int, classes: int, threads: int) -> dict:
    import parity_common as pc

    torch.set_num_threads(threads)
    stub = type(sys)("trainers.gpt3_prompts")  # the released module does not import (see parity_heba.py)
    stub.load_CuPL_templates = lambda dataset_name: {}
    # ViT-B/16 random weights under OpenAI's names, rounded to fp16 as OpenAI's checkpoints are
    heba, _, tmp = pc.load_reference(Path(checkout), "heba", {"trainers.gpt3_prompts": stub},
                                     state_dict=pc.fp16_state_dict("ViT-B-16-quickgelu"), backbone_name="ViT-B/16")
    cfg = {
        "MODEL": {"BACKBONE": {"NAME": "ViT-B/16"}, "INIT_WEIGHTS": ""},
        "INPUT": {"SIZE": [224, 224]},
        "DATASET": {"NAME": "Benchmark"},
        "OPTIM": {},
        "TRAINER": {"HeBA": {"PREC": "fp32", "ADAPTER_START": 1, "ADAPTER_END": 12, "ADAPTER_SCALE_BASE": 0.025,
                             "ADAPTER_SCALE_NOVEL": 0.010, "ADAPTER_SCALE_FACTOR": 2.25, "SLOW_FAST_RATIO": 0.8,
                             "NEG_SAMPLING_RATIO": 5, "TEXT_CTX_INIT": "a photo of a"}},
    }
    torch.manual_seed(0)
    with tmp:
        trainer = pc.build_trainer(heba.HeBA, cfg, [f"class number {i}" for i in range(classes)])
    images = torch.randn(batch, 3, 224, 224)
    labels = torch.arange(batch) % classes
    trainer.set_model_mode("train")
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.0075, momentum=0.9, weight_decay=5e-4)  # the stub trainer does not step

    def step():
        trainer.forward_backward({"img": images, "label": labels})
        opt.step()

    step()  # warm-up
    t = best_time(step, steps)
    rss = _rss_gib()
    return {"name": "reference fp32", "seconds": t, "gflop": counted_gflop(step), "peak_rss_gib": rss,
            "trainable_parameters": sum(p.numel() for p in params), "threads": torch.get_num_threads()}


# --------------------------------------------------------------------------- driver
def _run_child(args: argparse.Namespace, *child: str) -> dict:
    cmd = [sys.executable, __file__, "--child", *child, "--steps", str(args.steps), "--batch", str(args.batch),
           "--classes", str(args.classes), "--threads", str(args.threads)]
    if args.reference:
        cmd += ["--reference", args.reference]
    if args.profile:
        cmd += ["--profile"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{' '.join(child)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", default=None, help="a checkout of github.com/Jahid12012021/VLM-HeBA")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per column (best of)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--classes", type=int, default=50)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--bf16", action="store_true", help="also time vladapt in bf16 (slow without native bf16)")
    ap.add_argument("--profile", action="store_true", help="print the top-10 operators of each vladapt column's step")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind = args.child[0]
        if kind == "peak":
            res = matmul_peak(args.threads)
        elif kind == "reference":
            res = child_reference(args.reference, args.steps, args.batch, args.classes, args.threads)
        else:
            res = child_vladapt(args.child[1], args.steps, args.batch, args.classes, args.threads,
                                args.profile)
        print(json.dumps(res))
        return

    from vladapt.engine.precision import auto_precision, cpu_bf16_instructions

    auto = auto_precision("cpu")
    peak = _run_child(args, "peak")
    cols = []
    if args.reference:
        cols.append(_run_child(args, "reference"))
    else:
        print("reference: no --reference CHECKOUT of the authors' VLM-HeBA code given; its column is skipped\n")
    cols.append(_run_child(args, "vladapt", "fp32"))
    if auto != "fp32":
        cols.append(_run_child(args, "vladapt", auto))
    if args.bf16 and auto != "bf16":
        cols.append(_run_child(args, "vladapt", "bf16"))
    ref = cols[0] if args.reference else None
    v = cols[-1]
    print(f"HeBA on ViT-B/16 (random weights), batch {args.batch}, {v['classes_in_step']} classes in the step, "
          f"{v['trainable_parameters']:,} trainable parameters, {args.threads} threads")
    print(f"CPU bf16 instructions: {cpu_bf16_instructions() or 'none'}; precision auto = {auto}"
          + (" (the fp32 column)" if auto == "fp32" else ""))
    print(f"matmul peak of this CPU: fp32 {peak['fp32']:.1f} GFLOP/s, bf16 {peak['bf16']:.1f} GFLOP/s\n")
    w = 18
    print(f"{'':<30}" + "".join(f"{c['name']:>{w}}" for c in cols))

    def row(label, fmt):
        print(f"{label:<30}" + "".join(f"{fmt(c):>{w}}" for c in cols))

    row("seconds per step", lambda c: f"{c['seconds']:.2f}")
    row("images per second", lambda c: f"{args.batch / c['seconds']:.2f}")
    if ref:
        row("speed-up over the reference", lambda c: f"{ref['seconds'] / c['seconds']:.2f}x")
    row("GFLOP per step (counted)", lambda c: f"{c['gflop']:.0f}")
    row("achieved GFLOP/s", lambda c: f"{c['gflop'] / c['seconds']:.1f}")

    def peak_of(c):  # the matmul peak of the column's precision
        return peak["bf16"] if "bf16" in c["name"] else peak["fp32"]

    row("fraction of the matmul peak", lambda c: f"{100 * c['gflop'] / c['seconds'] / peak_of(c):.0f}%")
    row("step at the peak (s)", lambda c: f"{c['gflop'] / peak_of(c):.2f}")
    row("peak RSS (GiB)", lambda c: f"{c['peak_rss_gib']:.2f}")
    if any("matmul_share" in c for c in cols):  # --profile: how far the matrix products alone are from the peak
        row("matmul share of the step", lambda c: f"{100 * c['matmul_share']:.0f}%" if "matmul_share" in c else "-")
        row("matmul GFLOP/s (of its share)",
            lambda c: f"{c['gflop'] / (c['seconds'] * c['matmul_share']):.1f}" if "matmul_share" in c else "-")
    for c in cols:
        if c.get("profile"):
            print(f"\n{c['name']}: top-10 operators of one step\n{c['profile']}")


if __name__ == "__main__":
    main()
