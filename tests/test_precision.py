"""``precision: auto``: detecting native bf16 on the machine, resolving the precision names, the CLI's
default, the records that name the precision, ``vladapt bench``'s check, and that inference with the
backbone stored in bf16 (what ``auto`` picks on a native-bf16 machine) predicts what fp32 does."""

from __future__ import annotations

import json
import platform
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vladapt.engine import precision as P
from vladapt.errors import ConfigError

# /proc/cpuinfo of machines with and without native bf16 (one processor each, trimmed)
X86_AVX2 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B12
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht \
syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl nonstop_tsc cpuid extd_apicid tsc_known_freq \
pni pclmulqdq ssse3 fma cx16 sse4_1 sse4_2 movbe popcnt aes xsave avx f16c rdrand hypervisor lahf_lm cmp_legacy \
cr8_legacy abm sse4a misalignsse 3dnowprefetch osvw topoext ssbd ibrs ibpb stibp vmmcall fsgsbase bmi1 avx2 smep \
bmi2 rdseed adx smap clflushopt clwb sha_ni xsaveopt xsavec xgetbv1 clzero xsaveerptr arat npt nrip_save umip rdpid

"""
X86_AVX512_BF16 = X86_AVX2.replace("model name\t: AMD EPYC 7B12", "model name\t: AMD EPYC 9B14").replace(
    " avx2 ", " avx2 avx512f avx512dq avx512cd avx512bw avx512vl avx512_bf16 avx512vbmi avx512_vnni ")
X86_AMX = X86_AVX2.replace("AuthenticAMD", "GenuineIntel").replace(
    " avx2 ", " avx2 avx512f avx512dq avx512bw avx512vl avx512_vnni avx512_bf16 avx512_fp16 "
              "amx_bf16 amx_tile amx_int8 ")
ARM_NO_BF16 = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs
CPU implementer\t: 0x41
CPU architecture: 8
CPU part\t: 0xd0c

"""
ARM_BF16 = ARM_NO_BF16.replace(" ssbs\n", " ssbs sve svebf16 i8mm bf16 dgh rng\n").replace("0xd0c", "0xd40")


@pytest.fixture(autouse=True)
def fresh_detection():
    """``cpu_bf16_instructions`` is cached per process: every test starts and ends with a fresh one."""
    P.cpu_bf16_instructions.cache_clear()
    yield
    P.cpu_bf16_instructions.cache_clear()


def machine(monkeypatch, capabilities, cpuinfo: str | None, arch: str = "x86_64", system: str = "Linux") -> None:
    """Pretend to run on a CPU: ``capabilities`` is what torch reports (a dict, or an exception to
    raise), ``cpuinfo`` the text of /proc/cpuinfo (``None``: the system has none)."""
    def get_capabilities() -> dict:
        if isinstance(capabilities, Exception):
            raise capabilities
        return dict(capabilities)

    monkeypatch.setattr(torch.cpu, "get_capabilities", get_capabilities, raising=False)
    monkeypatch.setattr(P, "_cpuinfo_text", lambda: cpuinfo)
    monkeypatch.setattr(platform, "machine", lambda: arch)
    monkeypatch.setattr(platform, "system", lambda: system)


# ---------------------------------------------------------------------------- detection


@pytest.mark.parametrize("capabilities, expected", [
    ({"avx2": True, "avx512_bf16": True, "amx_bf16": False}, "avx512_bf16"),
    ({"avx512_bf16": True, "amx_bf16": True}, "amx_bf16"),
    ({"amx_bf16": True}, "amx_bf16"),
])
def test_torch_capabilities_name_the_bf16_instructions(monkeypatch, capabilities, expected):
    machine(monkeypatch, capabilities, X86_AVX2)  # torch's answer wins over the operating system's
    assert P.cpu_bf16_instructions() == expected
    assert P.auto_precision("cpu") == "bf16"


@pytest.mark.parametrize("capabilities", [RuntimeError("no cpuinfo in this build"), {},
                                          {"avx2": True, "avx512_bf16": False, "amx_bf16": False}],
                         ids=["raises", "empty", "all-false"])
@pytest.mark.parametrize("cpuinfo, expected", [(X86_AVX2, None), (X86_AVX512_BF16, "avx512_bf16"),
                                               (X86_AMX, "amx_bf16"), ("", None)],
                         ids=["avx2", "avx512_bf16", "amx", "unreadable"])
def test_x86_flags_of_proc_cpuinfo_when_torch_does_not_know(monkeypatch, capabilities, cpuinfo, expected):
    machine(monkeypatch, capabilities, cpuinfo)
    assert P.cpu_bf16_instructions() == expected
    assert P.auto_precision("cpu") == ("bf16" if expected else "fp32")


@pytest.mark.parametrize("arch", ["aarch64", "arm64"])
def test_arm_bf16_feature(monkeypatch, arch):
    machine(monkeypatch, {}, ARM_NO_BF16, arch=arch)
    assert P.cpu_bf16_instructions() is None and P.auto_precision("cpu") == "fp32"
    P.cpu_bf16_instructions.cache_clear()
    machine(monkeypatch, {}, ARM_BF16, arch=arch)
    assert P.cpu_bf16_instructions() == "arm_bf16" and P.auto_precision("cpu") == "bf16"
    # "svebf16" alone is not the BF16 extension: only the exact feature name counts
    P.cpu_bf16_instructions.cache_clear()
    machine(monkeypatch, {}, ARM_NO_BF16.replace(" ssbs\n", " ssbs svebf16\n"), arch=arch)
    assert P.cpu_bf16_instructions() is None


def test_arm_feature_counts_only_on_arm(monkeypatch):
    machine(monkeypatch, {}, ARM_BF16, arch="x86_64")
    assert P.cpu_bf16_instructions() is None


@pytest.mark.parametrize("answer, expected", [("1\n", "arm_bf16"), ("0\n", None), ("", None),
                                              (OSError("no sysctl"), None),
                                              (subprocess.TimeoutExpired("sysctl", 5), None)])
def test_macos_asks_sysctl(monkeypatch, answer, expected):
    machine(monkeypatch, {}, None, arch="arm64", system="Darwin")
    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        if isinstance(answer, Exception):
            raise answer
        return subprocess.CompletedProcess(cmd, 0, stdout=answer, stderr="")

    monkeypatch.setattr(subprocess, "run", run)
    assert P.cpu_bf16_instructions() == expected
    assert calls == [["sysctl", "-n", "hw.optional.arm.FEAT_BF16"]]


@pytest.mark.parametrize("arch, system", [("x86_64", "Darwin"), ("AMD64", "Windows"), ("aarch64", "Linux")])
def test_no_cpuinfo_and_no_sysctl_means_no_bf16(monkeypatch, arch, system):
    machine(monkeypatch, {}, None, arch=arch, system=system)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("sysctl is asked on Apple silicon only"))
    assert P.cpu_bf16_instructions() is None and P.auto_precision("cpu") == "fp32"


def test_detection_runs_once_per_process(monkeypatch):
    calls = []
    machine(monkeypatch, {}, X86_AVX512_BF16)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: calls.append(1) or {})
    assert [P.cpu_bf16_instructions() for _ in range(3)] == ["avx512_bf16"] * 3
    assert len(calls) == 1


# ---------------------------------------------------------------------------- resolution


def test_auto_on_the_cpu_follows_the_instructions(monkeypatch):
    monkeypatch.setattr(P, "cpu_bf16_instructions", lambda: None)
    assert P.auto_precision("cpu") == P.auto_precision(torch.device("cpu")) == "fp32"
    assert P.resolve_precision("auto", "cpu") == "fp32"
    monkeypatch.setattr(P, "cpu_bf16_instructions", lambda: "amx_bf16")
    assert P.auto_precision("cpu") == P.auto_precision(torch.device("cpu")) == "bf16"
    assert P.resolve_precision("auto", "cpu") == "bf16"


@pytest.mark.parametrize("supported, expected", [(True, "bf16"), (False, "fp16")])
def test_auto_on_cuda_follows_the_gpu(monkeypatch, supported, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
    monkeypatch.setattr(P, "cpu_bf16_instructions", lambda: pytest.fail("the CPU is not asked for a GPU"))
    for device in ("cuda", "cuda:1", torch.device("cuda", 0)):
        assert P.auto_precision(device) == expected
        assert P.resolve_precision("auto", device) == expected


@pytest.mark.parametrize("device", ["mps", "meta", "xpu"])
def test_auto_on_other_devices_is_fp32(monkeypatch, device):
    monkeypatch.setattr(P, "cpu_bf16_instructions", lambda: "amx_bf16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert P.auto_precision(device) == "fp32" and P.resolve_precision("auto", device) == "fp32"


def test_explicit_precisions_are_kept(monkeypatch):
    monkeypatch.setattr(P, "cpu_bf16_instructions", lambda: None)  # bf16 is allowed (if slow) without them
    for name in ("fp32", "bf16"):
        assert P.resolve_precision(name, "cpu") == name
        assert P.resolve_precision(name, "cuda") == name
    assert P.resolve_precision("fp16", "cuda") == "fp16"


def test_fp16_on_the_cpu_names_what_to_use():
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device") as e:
        P.resolve_precision("fp16", "cpu")
    assert all(name in str(e.value) for name in ("bf16", "fp32", "auto"))
    with pytest.raises(ConfigError, match="fp16"):
        P.resolve_precision("fp16", torch.device("cpu"))


@pytest.mark.parametrize("name", ["fp64", "float32", "FP32", "", "half"])
def test_unknown_names_are_config_errors(name):
    with pytest.raises(ConfigError, match="is not one of"):
        P.resolve_precision(name, "cpu")
    with pytest.raises(ConfigError):
        P.precision_dtype(name)


def test_dtypes_and_names():
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        assert P.precision_dtype(name) == dtype and P.precision_name(dtype) == name
    with pytest.raises(ConfigError, match="resolve 'auto'"):
        P.precision_dtype("auto")
    with pytest.raises(ConfigError, match="float64"):
        P.precision_name(torch.float64)


def test_train_precision_follows_the_backbone_dtype():
    from vladapt.engine.train import train_precision

    assert train_precision("auto", torch.float32) == "fp32"
    assert train_precision("auto", torch.bfloat16) == "bf16"
    assert train_precision("auto", torch.float16) == "fp16"
    assert train_precision("auto", torch.float64) == "fp32"
    # an explicit train.precision is kept: bf16/fp16 autocast over an fp32 backbone
    assert train_precision("fp32", torch.float32) == "fp32"
    assert train_precision("bf16", torch.float32) == "bf16"
    assert train_precision("fp16", torch.float32) == "fp16"
    # fp32 training over a bf16/fp16 backbone would compute its layers in bf16/fp16: refused, saying what to do
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        with pytest.raises(ConfigError, match=f"needs a backbone stored in fp32, but it is stored in {name}.*"
                                              "--precision fp32"):
            train_precision("fp32", dtype)


def test_an_explicit_train_precision_outranks_auto_for_the_backbone(monkeypatch):
    monkeypatch.setattr(P, "cpu_bf16_instructions", lambda: "avx512_bf16")
    assert P.storage_dtype("auto") == P.storage_dtype("auto", train="auto") == torch.bfloat16
    assert P.storage_dtype("auto", train="fp32") == torch.float32
    monkeypatch.setattr(P, "cpu_bf16_instructions", lambda: None)
    assert P.storage_dtype("auto", train=None) == torch.float32
    assert P.storage_dtype("auto", train="bf16") == torch.bfloat16
    # an explicit backbone precision is kept (bf16 autocast over fp32 weights is a valid run)
    assert P.storage_dtype("fp32", train="bf16") == torch.float32
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        P.storage_dtype("auto", "cpu", train="fp16")


# ---------------------------------------------------------------------------- CLI, records, bench


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """synth_shapes at a tiny size: the data root holding it."""
    from vladapt.synth.datasets import write_dataset

    root = tmp_path_factory.mktemp("precision") / "data"
    write_dataset("synth_shapes", root, seed=0, per_class=(4, 2, 3))
    return root


def parse(*argv: str):
    from vladapt.cli import _overrides_last, build_parser

    parser = build_parser()
    return parser.parse_args(_overrides_last(parser, list(argv)))


COMMANDS = {
    "train": ["train", "--method", "heba", "--protocol", "base2new", "--dataset", "synth_shapes", "--root", "data"],
    "eval": ["eval", "--method", "zeroshot", "--protocol", "fewshot", "--dataset", "synth_shapes", "--root", "data"],
    "zeroshot": ["zeroshot", "--folder", "imgs"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_cli_precision_defaults_to_auto(monkeypatch, command):
    from vladapt.cli import _dtype

    args = parse(*COMMANDS[command])
    assert args.precision == "auto"
    assert _dtype(args) == P.precision_dtype(P.auto_precision("cpu"))  # this machine's choice
    monkeypatch.setattr(P, "cpu_bf16_instructions", lambda: None)
    assert _dtype(args) == torch.float32
    monkeypatch.setattr(P, "cpu_bf16_instructions", lambda: "avx512_bf16")
    assert _dtype(args) == torch.bfloat16
    # an explicit --precision is what it says, on any machine
    assert _dtype(parse(*COMMANDS[command], "--precision", "fp32")) == torch.float32
    monkeypatch.setattr(P, "cpu_bf16_instructions", lambda: None)
    assert _dtype(parse(*COMMANDS[command], "--precision", "bf16")) == torch.bfloat16
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        _dtype(parse(*COMMANDS[command], "--precision", "fp16"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert _dtype(parse(*COMMANDS[command], "--device", "cuda")) == torch.float16


@pytest.mark.parametrize("instructions, expected", [(None, "fp32"), ("avx512_bf16", "bf16")])
def test_cli_runs_load_the_backbone_auto_picks_and_records_name_it(shapes, tmp_path, monkeypatch, capsys,
                                                                   instructions, expected):
    """``vladapt eval`` (zero-shot) and ``vladapt train`` (CLIP-Adapter, one epoch) with the default
    precision on a machine without / with native bf16: the backbone is loaded in fp32 / bf16 and the
    records say so (training autocasts in the backbone's precision)."""
    from vladapt.backbones import loader
    from vladapt.cli import main

    monkeypatch.setattr(P, "cpu_bf16_instructions", lambda: instructions)
    loaded = []
    load_clip = loader.load_clip

    def spy(*args, **kwargs):
        backbone = load_clip(*args, **kwargs)
        loaded.append(backbone.model.dtype)
        return backbone

    monkeypatch.setattr("vladapt.backbones.load_clip", spy)
    common = ["--protocol", "fewshot", "--dataset", "synth_shapes", "--root", str(shapes), "--model",
              "vladapt-test-tiny", "--shots", "1", "--out", str(tmp_path), "--quiet"]
    assert main(["eval", "--method", "zeroshot", *common]) == 0
    assert main(["train", "--method", "clip_adapter", *common, "train.epochs=1", "train.warmup_epochs=0"]) == 0
    capsys.readouterr()
    assert loaded == [P.precision_dtype(expected)] * 2
    zeroshot = json.loads((tmp_path / "fewshot/zeroshot/synth_shapes/shots_1-seed_1.json").read_text())
    adapter = json.loads((tmp_path / "fewshot/clip_adapter/synth_shapes/shots_1-seed_1.json").read_text())
    assert zeroshot["precision"] == {"backbone": expected, "train": None}  # nothing was trained
    assert adapter["precision"] == {"backbone": expected, "train": expected}
    assert adapter["trained"] and 0 <= adapter["results"]["test"]["accuracy"] <= 100
    # train.precision=fp32 asks for fp32 on any machine: the backbone is loaded in fp32 for it
    assert main(["train", "--method", "clip_adapter", *common[:-3], "--out", str(tmp_path / "fp32"), "--quiet",
                 "train.epochs=1", "train.warmup_epochs=0", "train.precision=fp32"]) == 0
    assert loaded[-1] == torch.float32
    fp32 = json.loads((tmp_path / "fp32/fewshot/clip_adapter/synth_shapes/shots_1-seed_1.json").read_text())
    assert fp32["precision"] == {"backbone": "fp32", "train": "fp32"}


def test_bench_precision_is_checked_and_resolved_per_worker(shapes, tmp_path, monkeypatch, capsys):
    from vladapt.bench import bench
    from vladapt.cli import main

    values = {"methods": ["zeroshot"], "datasets": ["synth_shapes"], "protocols": ["fewshot"], "root": shapes,
              "out": tmp_path / "out", "model": "vladapt-test-tiny"}
    assert bench.make_spec(dict(values)).precision == "auto"
    for name in ("fp32", "bf16", "fp16"):
        assert bench.make_spec({**values, "precision": name}).precision == name
    with pytest.raises(ConfigError, match="precision 'fp64' is not one of"):
        bench.make_spec({**values, "precision": "fp64"})
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"methods: [zeroshot]\ndatasets: [synth_shapes]\nprotocols: [fewshot]\nroot: {shapes}\n"
                    f"out: {tmp_path / 'out'}\nmodel: vladapt-test-tiny\nprecision: fp64\n")
    assert main(["bench", "--grid", str(grid)]) == 2
    assert "precision 'fp64' is not one of" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before any run
    # a worker resolves auto on its own machine
    monkeypatch.setattr(bench, "_BACKBONES", {})
    job = SimpleNamespace(model="vladapt-test-tiny", pretrained=None, device="cpu", precision="auto", train_config=None)
    monkeypatch.setattr(P, "cpu_bf16_instructions", lambda: "amx_bf16")
    assert bench._backbone(job).model.dtype == torch.bfloat16
    # a run whose train.precision is fp32 gets an fp32 backbone there (auto yields to the explicit choice)
    fp32_job = SimpleNamespace(**{**vars(job), "train_config": SimpleNamespace(precision="fp32")})
    assert bench._backbone(fp32_job).model.dtype == torch.float32
    assert bench._backbone(job).model.dtype == torch.bfloat16  # the two are kept apart
    monkeypatch.setattr(bench, "_BACKBONES", {})
    monkeypatch.setattr(P, "cpu_bf16_instructions", lambda: None)
    assert bench._backbone(job).model.dtype == torch.float32


# ---------------------------------------------------------------------------- accuracy equivalence


def test_bf16_inference_predicts_what_fp32_does(tmp_path_factory):
    """The precision ``auto`` chooses on a machine with native bf16 gives the accuracy of fp32: HeBA,
    trained briefly for base-to-new on synth_shapes with the bundled vladapt-tiny in fp32, is evaluated
    with the SAME trained weights on the base and new test images with the backbone stored in fp32 and
    in bf16 (``load_clip(..., dtype=torch.bfloat16)``, what ``auto`` loads on such a machine). The
    argmax agrees on at least 99 % of the images and the harmonic means differ by at most 0.5.

    What is checked is inference in the chosen precision given the same weights: training in bf16 is
    left out because a CPU without native bf16 instructions emulates it at a small fraction of fp32's
    speed, too slow for a test."""
    from vladapt.backbones import load_clip
    from vladapt.config import from_mapping
    from vladapt.engine.train import TrainConfig, fit
    from vladapt.protocols.runner import RunSettings, run_protocol
    from vladapt.synth.datasets import write_dataset

    t0 = time.perf_counter()
    root = tmp_path_factory.mktemp("equivalence") / "data"
    write_dataset("synth_shapes", root, seed=0, per_class=(4, 2, 10))  # 8 base + 8 new classes, 10 test images each
    backbones = {"fp32": load_clip("vladapt-tiny"), "bf16": load_clip("vladapt-tiny", dtype=torch.bfloat16)}
    assert backbones["bf16"].model.dtype == torch.bfloat16
    logits: dict[str, list[torch.Tensor]] = {"fp32": [], "bf16": []}
    weights: dict[str, dict[str, torch.Tensor]] = {}

    def record_logits(method, name: str) -> None:
        method.register_forward_hook(lambda module, inputs, out: logits[name].append(out.detach().float()))

    def train_in_fp32(method, splits, seed, run_dir):
        before = {k: v.detach().clone() for k, v in method.checkpoint_state().items()}
        cfg = from_mapping(TrainConfig, {"epochs": 3, "batch_size": 8, "lr": 0.02, "precision": "auto"})
        fit(method, splits, cfg, seed, progress=False)
        weights.update({k: v.detach().clone() for k, v in method.checkpoint_state().items()})
        assert any(not torch.equal(before[k], weights[k]) for k in weights)  # training moved the weights
        record_logits(method, "fp32")

    def load_into_bf16(method, splits, seed, run_dir):
        method.load_checkpoint_state(weights)
        loaded = method.checkpoint_state()
        assert loaded.keys() == weights.keys()
        assert all(torch.equal(loaded[k].float(), weights[k].float()) for k in weights)
        record_logits(method, "bf16")

    records = {name: run_protocol("base2new", RunSettings(backbone=backbones[name], root=root, method="heba",
                                                          train_fn=fn, progress=False), "synth_shapes", 4, 1)
               for name, fn in (("fp32", train_in_fp32), ("bf16", load_into_bf16))}
    assert records["fp32"]["precision"] == {"backbone": "fp32", "train": "fp32"}
    assert records["bf16"]["precision"]["backbone"] == "bf16"
    results = {name: rec["results"] for name, rec in records.items()}
    images = results["fp32"]["base"]["total"] + results["fp32"]["new"]["total"]
    assert images == 160
    out = {name: torch.cat(batches) for name, batches in logits.items()}
    assert out["fp32"].shape[0] == out["bf16"].shape[0] == images  # every base and new test image, once each
    assert not torch.equal(out["fp32"], out["bf16"])  # bf16 really computed something else
    agreement = (out["fp32"].argmax(1) == out["bf16"].argmax(1)).double().mean().item() * 100
    hm = {name: r["hm"] for name, r in results.items()}
    print(f"\nfp32 vs bf16 inference: argmax agreement {agreement:.2f} % of {images} images, HM fp32 {hm['fp32']:.2f} "
          f"bf16 {hm['bf16']:.2f}, base {results['fp32']['base']['accuracy']:.2f} / "
          f"{results['bf16']['base']['accuracy']:.2f}, new {results['fp32']['new']['accuracy']:.2f} / "
          f"{results['bf16']['new']['accuracy']:.2f}, largest logit difference "
          f"{(out['fp32'] - out['bf16']).abs().max().item():.3g} ({time.perf_counter() - t0:.1f} s)")
    assert agreement >= 99.0
    assert abs(hm["fp32"] - hm["bf16"]) <= 0.5
