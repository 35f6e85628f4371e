"""Shared pieces of the performance benchmarks: this CPU's matmul peak and a step's counted FLOPs.

Every benchmark prints its figures also as a fraction of the matmul peak measured in the same run,
for the FLOPs its work needs (counted with ``torch.utils.flop_counter``), so that a ratio says how
close to the hardware's limit a path is, not only how it compares with another path.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Callable

import torch


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of ``repeats`` timed calls of ``fn`` (seconds)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_peak(threads: int | None = None) -> dict[str, float]:
    """GFLOP/s of this CPU's matrix multiply with the current (or ``threads``) torch threads, the best
    of the large shapes of a ViT-B/16 step and a square one; bf16 on a small square one only when
    the CPU has no native bf16 instructions (it is emulated and slow there)."""
    from vladapt.engine.precision import cpu_bf16_instructions

    if threads is not None:
        torch.set_num_threads(threads)
    large = [(3152, 768, 3072), (3152, 3072, 768), (2048, 2048, 2048)]
    out = {}
    for name, dtype, shapes in (("fp32", torch.float32, large),
                                ("bf16", torch.bfloat16, large if cpu_bf16_instructions() else [(512, 512, 512)])):
        best = 0.0
        for m, k, n in shapes:
            a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
            a @ b  # warm-up
            best = max(best, 2 * m * k * n / best_time(lambda: a @ b, 3) / 1e9)
        out[name] = best
    return out


def add_precision_option(ap: argparse.ArgumentParser) -> None:
    """``--precision`` (default auto), as the CLI's: the backbone's storage precision of a benchmark."""
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="the backbone's precision, as the CLI's --precision (default: %(default)s)")


def precision_of(args: argparse.Namespace) -> tuple[torch.dtype, str]:
    """(dtype, name) of ``args.precision`` on this machine (``auto`` resolved as the CLI resolves it)."""
    from vladapt.engine.precision import precision_name, storage_dtype

    dtype = storage_dtype(args.precision)
    return dtype, precision_name(dtype)


def _conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """Input and weight gradients of a (grouped) convolution: each costs what the forward costs,
    2 * |output| * |weight per output channel| (the weight's shape already holds C_in / groups).
    PyTorch's own formula ignores the groups and counts a depthwise convolution's gradients ~100x."""
    per = 2 * math.prod(grad_out_shape) * math.prod(w_shape[1:])
    return per * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def counted_gflop(fn: Callable[[], object]) -> float:
    """Run ``fn`` once under the FLOP counter; returns its GFLOP (matmuls, convolutions, their gradients)."""
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {torch.ops.aten.convolution_backward: _conv_backward_flop}
    with FlopCounterMode(display=False, custom_mapping=mapping) as fc:
        fn()
    return fc.get_total_flops() / 1e9
