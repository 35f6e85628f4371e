"""vladapt.host_memory: large freed blocks are reused (no page faults in the next step), in
the processes vladapt owns, and not when turned off. Each case runs in a fresh interpreter, since
the setting is process-wide."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the malloc setting exists on Linux with glibc only")

# Page faults per step of a small training loop whose activations are 38 MiB (3152 x 3072 floats, a
# ViT-B/16 MLP's at batch 16): above glibc's largest mmap threshold (32 MiB), like the real step's.
PROBE = r"""
import json, resource, sys
import torch
from vladapt import host_memory

applied = None
if sys.argv[1] == "tuned":
    applied = host_memory.reuse_freed_memory()
torch.manual_seed(0)
torch.set_num_threads(1)
layers = [torch.nn.Sequential(torch.nn.Linear(64, 3072), torch.nn.GELU(), torch.nn.Linear(3072, 64))
          for _ in range(3)]
x = torch.randn(3152, 64)

def step():
    h = x
    for layer in layers:
        h = h + layer(h)
    h.square().mean().backward()

faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"applied": applied, "faults": faults, "rss_kib": rss}))
"""


def probe(mode: str, **env) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         env={**os.environ, **env}, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_activation_blocks_are_reused_without_page_faults_unless_turned_off():
    off, tuned = probe("tuned", VLADAPT_TUNE_MALLOC="0"), probe("tuned")
    assert off["applied"] is False and tuned["applied"] is True
    # without the setting every step maps its large activations afresh: as many faults as the first step
    # (counted per page, or per huge page where the kernel backs them so)
    assert min(off["faults"][2:]) > off["faults"][0] / 2 > 0
    # with it, once the first steps have grown the heap, the later steps fault in a small fraction
    assert sum(tuned["faults"][2:]) < sum(off["faults"][2:]) / 10
    assert tuned["rss_kib"] < 1.5 * off["rss_kib"]  # the heap holds about what a step's peak needs


def test_the_vladapt_command_turns_it_on_and_python_calls_of_main_do_not():
    code = ("import sys; from vladapt import cli, host_memory; "
            "cli.main(['info']); print('python call:', host_memory._applied); "
            "sys.argv = ['vladapt', 'info']; cli.main(); print('command:', host_memory._applied)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    marks = [line for line in out.stdout.splitlines() if line.startswith(("python call:", "command:"))]
    assert marks == ["python call: []", "command: [True]"]
