"""Frozen ViT-B/16 forward time: open_clip's blocks vs vladapt's, in fp32 and bf16, side by side.

    python benchmarks/backbone_speed.py [--batch 16] [--prompts 50] [--repeats 3]

Random weights (the architecture decides the speed). Prints seconds per forward and ratios.
"""

from __future__ import annotations

import argparse
import time

import torch


def timeit(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    import open_clip

    from vladapt.backbones import load_clip
    from vladapt.backbones.loader import load_state_dict_into

    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    oc = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None).eval().requires_grad_(False)
    images = torch.randn(args.batch, 3, 224, 224)
    tokens = open_clip.get_tokenizer("ViT-B-16")(["a photo of a gerenuk, a type of antelope."] * args.prompts)
    rows, train_rows = [], []
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        bb = load_clip("ViT-B-16-quickgelu", dtype=dtype)
        load_state_dict_into(bb.model, oc.state_dict(), "open_clip")
        ocp = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None, precision=precision).eval()
        ocp.load_state_dict(oc.state_dict())
        ocp.requires_grad_(False)
        with torch.no_grad():
            t_oc_img = timeit(lambda: ocp.encode_image(images.to(dtype)), args.repeats)
            t_va_img = timeit(lambda: bb.model.encode_image(images), args.repeats)
            t_oc_txt = timeit(lambda: ocp.encode_text(tokens), args.repeats)
            t_va_txt = timeit(lambda: bb.model.encode_text(tokens), args.repeats)
        rows.append((precision, t_oc_img, t_va_img, t_oc_txt, t_va_txt))

        # Training through the frozen blocks (what adapters in early blocks need): forward with the
        # input requiring grad, then backward to the input.
        def fwd_bwd(encode, x):
            x = x.detach().requires_grad_(True)
            encode(x).float().sum().backward()

        t_oc_fb = timeit(lambda: fwd_bwd(ocp.encode_image, images.to(dtype)), args.repeats)
        t_va_fb = timeit(lambda: fwd_bwd(bb.model.encode_image, images.to(dtype)), args.repeats)
        train_rows.append((precision, t_oc_fb, t_va_fb))
        del bb, ocp

    print(f"\nfrozen forward, seconds (batch {args.batch} images 224px / {args.prompts} prompts)")
    print(f"{'precision':<10}{'open_clip img':>15}{'vladapt img':>13}{'ratio':>8}{'open_clip txt':>15}{'vladapt txt':>13}{'ratio':>8}")
    for p, a, b, c, d in rows:
        print(f"{p:<10}{a:>15.3f}{b:>13.3f}{a / b:>7.2f}x{c:>15.3f}{d:>13.3f}{c / d:>7.2f}x")
    print(f"\nforward + backward to the input (images), seconds")
    print(f"{'precision':<10}{'open_clip':>12}{'vladapt':>10}{'ratio':>8}")
    for p, a, b in train_rows:
        print(f"{p:<10}{a:>12.3f}{b:>10.3f}{a / b:>7.2f}x")
    fp32, bf16 = rows
    print(f"\nvladapt bf16 vs vladapt fp32: images {fp32[2] / bf16[2]:.2f}x faster, text {fp32[4] / bf16[4]:.2f}x faster")
    print(f"open_clip bf16 vs open_clip fp32: images {fp32[1] / bf16[1]:.2f}x, text {fp32[3] / bf16[3]:.2f}x")


if __name__ == "__main__":
    main()
