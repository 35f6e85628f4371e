"""HeBA training step on ViT-B/16 (random weights): fp32 vs vladapt's fastest CPU path, side by side.

    python benchmarks/heba_step.py [--steps 3] [--batch 16] [--classes 50]

Setting (issue "Training engine and HeBA"): batch 16 images of 16 different classes out of 50, so
negative sampling (ratio 5) puts all 50 classes into the step's text batch. Each precision runs in
its own process so that peak RSS is measured per configuration. Printed: seconds per training step,
images/s, HeBA forward vs frozen forward (both without gradients), and peak RSS.

For scale (measured on a 2-core CPU): the released reference implementation takes 24.2 s per step
(0.66 img/s) with a peak RSS of 11.7 GB in fp32.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

REFERENCE = {"seconds_per_step": 24.2, "images_per_second": 0.66, "peak_rss_gib": 11.7 / 1.073741824}


def _best(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def child(precision: str, steps: int, batch: int, classes: int) -> dict:
    from vladapt.backbones import ForwardContext, load_clip
    from vladapt.engine.train import StepInfo, autocast_context, build_optimizer
    from vladapt.engine.runconfig import resolve_run_config
    from vladapt.methods import create_method

    torch.manual_seed(0)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    bb = load_clip("ViT-B-16-quickgelu", dtype=dtype)
    names = [f"class number {i}" for i in range(classes)]
    heba = create_method("heba", bb, names)
    method_cfg, train_cfg = resolve_run_config("heba", "base2new")
    params = [p for p in heba.parameters() if p.requires_grad]
    opt = build_optimizer(train_cfg, params)
    images = torch.randn(batch, 3, 224, 224)
    labels = torch.arange(batch) % classes
    tokens = bb.tokenizer(heba.bank.all_for_template(0))

    def step_fn():
        step = StepInfo(0, 0, torch.Generator().manual_seed(0), labels, slice(0, batch), batch)
        with autocast_context(precision, "cpu"):
            out = heba.training_step(images, labels, step)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        return out

    heba.train()
    n_classes_in_step = step_fn().logits.shape[1]
    t_step = _best(step_fn, steps)

    def frozen_forward():
        with torch.no_grad(), autocast_context(precision, "cpu"):
            bb.model.encode_image(images)
            bb.model.encode_text(tokens)

    def heba_forward():
        ctx = ForwardContext(lambda tower, layer: 0.025)
        with torch.no_grad(), autocast_context(precision, "cpu"), heba.attached():
            bb.model.encode_image(images, ctx)
            bb.model.encode_text(tokens, ctx)

    t_frozen = _best(frozen_forward, steps)
    t_heba = _best(heba_forward, steps)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # KiB -> GiB
    return {"precision": precision, "seconds_per_step": t_step, "images_per_second": batch / t_step,
            "classes_in_step": n_classes_in_step, "frozen_forward": t_frozen, "heba_forward": t_heba,
            "forward_ratio": t_heba / t_frozen, "peak_rss_gib": rss,
            "trainable_parameters": heba.num_trainable_parameters(), "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--classes", type=int, default=50)
    ap.add_argument("--child", choices=["fp32", "bf16"])
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.batch, args.classes)))
        return
    rows = []
    for precision in ("fp32", "bf16"):
        out = subprocess.run([sys.executable, __file__, "--child", precision, "--steps", str(args.steps),
                              "--batch", str(args.batch), "--classes", str(args.classes)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    r = rows[0]
    print(f"HeBA on ViT-B/16, batch {args.batch}, {r['classes_in_step']} classes in the step, "
          f"{r['trainable_parameters']:,} trainable parameters, {r['threads']} threads\n")
    print(f"{'':<26}{'reference fp32':>16}" + "".join(f"{'vladapt ' + x['precision']:>16}" for x in rows))
    print(f"{'seconds per step':<26}{REFERENCE['seconds_per_step']:>16.2f}"
          + "".join(f"{x['seconds_per_step']:>16.2f}" for x in rows))
    print(f"{'images per second':<26}{REFERENCE['images_per_second']:>16.2f}"
          + "".join(f"{x['images_per_second']:>16.2f}" for x in rows))
    print(f"{'speed-up vs reference':<26}{1.0:>15.2f}x"
          + "".join(f"{REFERENCE['seconds_per_step'] / x['seconds_per_step']:>15.2f}x" for x in rows))
    print(f"{'frozen forward (s)':<26}{'':>16}" + "".join(f"{x['frozen_forward']:>16.2f}" for x in rows))
    print(f"{'HeBA forward (s)':<26}{'':>16}" + "".join(f"{x['heba_forward']:>16.2f}" for x in rows))
    print(f"{'HeBA / frozen forward':<26}{'':>16}" + "".join(f"{x['forward_ratio']:>15.2f}x" for x in rows))
    print(f"{'peak RSS (GiB)':<26}{REFERENCE['peak_rss_gib']:>16.2f}" + "".join(f"{x['peak_rss_gib']:>16.2f}" for x in rows))
    print("\ntargets: <= 8 s per step (aim 4 s), HeBA forward <= 1.9x frozen (1.68x is the FLOP floor), "
          "peak RSS < 6 GiB")


if __name__ == "__main__":
    main()
