"""``load_clip``: a frozen CLIP with its tokenizer and transforms, from any of the usual sources.

Sources of weights (``pretrained``):

* ``None``: seeded random weights (tiny test configs, architecture tests, pretraining from scratch);
* an open_clip pretrained tag (``"openai"``, ``"laion2b_s34b_b88k"``, ...): read from the local cache
  or downloaded where the hub is reachable; offline it fails at once with a message that says how
  to pass a local file instead;
* a local file: an OpenAI TorchScript archive (``ViT-B-16.pt``), a plain state dict saved with
  ``torch.save`` (OpenAI or open_clip key names, optionally nested under ``"state_dict"`` with a
  ``"module."`` prefix) or a ``.safetensors`` file. Pickles are read with ``weights_only=True``:
  vladapt never unpickles arbitrary objects.
"""

from __future__ import annotations

import hashlib
import os
import socket
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import torch
from torch import Tensor

from vladapt.backbones.model import CLIPConfig, CLIPModel, TextConfig, VisionConfig
from vladapt.backbones.transforms import CLIP_MEAN, CLIP_STD, test_transform, train_transform
from vladapt.errors import BackboneError

# Tiny configs keep the real architecture (ViT with CLS + patch grid, causal text transformer with
# CLIP's BPE vocabulary) at a size that runs in milliseconds on a CPU.
TINY_CONFIGS: dict[str, CLIPConfig] = {
    "vladapt-test-tiny": CLIPConfig(
        embed_dim=64,
        vision=VisionConfig(image_size=32, patch_size=8, width=128, layers=2, head_width=64),
        text=TextConfig(context_length=77, vocab_size=49408, width=128, heads=2, layers=2),
        quick_gelu=True,
    ),
    # The embedded default: pretrained by vladapt on its synthetic world (weights bundled, see below).
    "vladapt-tiny": CLIPConfig(
        embed_dim=128,
        vision=VisionConfig(image_size=64, patch_size=8, width=128, layers=4, head_width=64),
        text=TextConfig(context_length=32, vocab_size=49408, width=128, heads=2, layers=3),
        quick_gelu=False,
    ),
}


# Models whose weights ship inside the package: name -> weights file in vladapt/backbones/weights/.
# The sidecar JSON next to the file records the architecture, the fingerprint and how the weights
# were made (`vladapt synth pretrain`).
BUNDLED_MODELS: dict[str, str] = {"vladapt-tiny": "vladapt-tiny.safetensors"}


def bundled_weights_path(name: str) -> Path:
    return Path(__file__).resolve().parent / "weights" / BUNDLED_MODELS[name]


def _bundled_state_dict(name: str) -> tuple[dict[str, Tensor], str]:
    """The bundled weights of ``name`` and their recorded fingerprint (checked after loading)."""
    import json

    path = bundled_weights_path(name)
    sidecar = path.with_suffix(".json")
    if not path.is_file() or not sidecar.is_file():
        raise BackboneError(
            f"the bundled weights of {name!r} are missing ({path.name} and {sidecar.name} in the package's "
            "backbones/weights folder); reinstall vladapt, or recreate them with `vladapt synth pretrain`"
        )
    sd, _ = read_checkpoint(path)
    return sd, json.loads(sidecar.read_text())["fingerprint"]


class Tokenizer:
    """CLIP's BPE tokenizer (open_clip's), padding/truncating to the model's context length.

    ``tokenizer(["a photo of a cat"])`` -> ``LongTensor [N, context_length]`` with SOT first and
    EOT (the highest id) at the end of the text, or in the last slot when the text is truncated.
    """

    def __init__(self, context_length: int) -> None:
        from open_clip.tokenizer import SimpleTokenizer

        self.context_length = context_length
        self._tok = SimpleTokenizer(context_length=context_length)

    def __call__(self, texts: str | list[str]) -> Tensor:
        return self._tok(texts, context_length=self.context_length)


@dataclass
class Backbone:
    """A loaded, frozen CLIP with what is needed to feed it."""

    model: CLIPModel
    tokenizer: Tokenizer
    train_transform: Callable
    test_transform: Callable
    name: str
    pretrained: str | None
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    _fingerprint: str | None = field(default=None, repr=False)

    @property
    def fingerprint(self) -> str:
        """A hash of the source weights (sha256 over their fp32 values in key order, taken before any
        cast to a lower storage precision), 16 hex digits."""
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self.model.state_dict())
        return self._fingerprint

    @property
    def image_size(self) -> int:
        return self.model.cfg.vision.image_size


def weights_fingerprint(state_dict: dict[str, Tensor], digits: int = 16) -> str:
    """sha256 over (key, shape, fp32 bytes) in key order (equal for a state dict and its exact
    fp32 copy), its first ``digits`` hex digits."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().to("cpu", torch.float32).contiguous()
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:digits]


def available_backbones() -> dict[str, list[str]]:
    """``{"tiny": [...], "open_clip": [...]}``: names ``load_clip`` accepts (architectures only)."""
    import open_clip

    supported = []
    for name in open_clip.list_models():
        try:
            CLIPConfig.from_open_clip(name, open_clip.get_model_config(name) or {})
        except (BackboneError, KeyError, TypeError):
            continue
        supported.append(name)
    return {"tiny": sorted(TINY_CONFIGS), "bundled": sorted(BUNDLED_MODELS), "open_clip": supported}


def _resolve_config(name: str, quick_gelu: bool | None) -> CLIPConfig:
    if name in TINY_CONFIGS:
        cfg = TINY_CONFIGS[name]
        return cfg if quick_gelu is None else CLIPConfig(cfg.embed_dim, cfg.vision, cfg.text, quick_gelu)
    import open_clip

    raw = open_clip.get_model_config(name)
    if raw is None:
        raise BackboneError(
            f"unknown backbone {name!r}. vladapt tiny configs: {sorted(TINY_CONFIGS)}; open_clip models: "
            "see `vladapt info` (e.g. ViT-B-16, ViT-B-16-quickgelu, ViT-L-14)"
        )
    return CLIPConfig.from_open_clip(name, raw, quick_gelu=quick_gelu)


def _looks_like_path(pretrained: str) -> bool:
    return os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")) or Path(pretrained).exists()


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Tensor], str]:
    """Read a weights file into a CPU state dict; returns ``(state_dict, format)``.

    ``format`` is ``"torchscript"`` (an OpenAI archive), ``"safetensors"`` or ``"state_dict"``.
    """
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"checkpoint file {str(path)!r} does not exist (pass an existing file to pretrained=...)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path)), "safetensors"
    if _is_torchscript(path):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation notice
                archive = torch.jit.load(str(path), map_location="cpu")
        except Exception as e:  # noqa: BLE001 - any failure means the archive is unusable
            raise BackboneError(f"cannot read TorchScript archive {str(path)!r}: {e}") from e
        sd = {k: v for k, v in archive.state_dict().items()}
        return sd, "torchscript"
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise BackboneError(
            f"cannot read {str(path)!r} as a weights-only checkpoint ({type(e).__name__}: {str(e).splitlines()[0]}). "
            "vladapt never unpickles arbitrary objects: save the weights with torch.save(model.state_dict(), path) "
            "or safetensors, or pass OpenAI's TorchScript archive."
        ) from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise BackboneError(f"{str(path)!r} does not hold a state dict of tensors")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj, "state_dict"


def _strip_openai_extras(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    # OpenAI's TorchScript archives carry these scalars next to the weights; traced open_clip models
    # also carry the text tower's causal mask, which this implementation derives itself.
    extras = ("input_resolution", "context_length", "vocab_size", "attn_mask")
    return {k: v for k, v in sd.items() if k not in extras}


def load_state_dict_into(model: CLIPModel, sd: dict[str, Tensor], source: str) -> None:
    """Strictly load ``sd`` into ``model``; a mismatch names the keys and shapes and the source."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(sd) if sd[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        def head(items: list[str]) -> str:
            return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {head(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {head(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches: {head(shapes)}")
        raise BackboneError(
            f"weights from {source} do not fit this architecture ({'; '.join(parts)}). "
            "Check that the model name matches the checkpoint (e.g. ViT-B-16 vs ViT-B-32)."
        )
    with torch.no_grad():
        for k, t in own.items():
            t.copy_(sd[k].to(t.dtype))


def _host_reachable(host: str, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_pretrained_tag(name: str, tag: str, cache_dir: str | None = None) -> tuple[str, dict]:
    """Local file for an open_clip (name, tag): the cache if present, else a download.

    Offline, this fails at once (a few seconds at most) instead of waiting through the hub's
    retries, with a message naming the model, the tag and how to pass a local file.
    """
    from open_clip import pretrained as ocp

    cfg = ocp.get_pretrained_cfg(name, tag)
    if not cfg:
        tags = ocp.list_pretrained_tags_by_model(name)
        raise BackboneError(
            f"open_clip has no pretrained tag {tag!r} for {name!r}; known tags: {tags or 'none'}. "
            "To use a local file pass its path: load_clip(name, pretrained='/path/to/weights.pt')"
        )
    cached = _cached_pretrained(cfg, cache_dir)
    if cached:
        return cached, cfg
    hub = cfg.get("hf_hub", "")
    host = "huggingface.co" if hub else (urlparse(cfg.get("url", "")).hostname or "")
    how = (
        f"Download the weights on a connected machine and pass the file: "
        f"load_clip({name!r}, pretrained='path/to/file') or `--pretrained path/to/file` on the CLI "
        "(OpenAI's TorchScript .pt archive, a state dict or a .safetensors file)."
    )
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not host or not _host_reachable(host):
        raise BackboneError(
            f"cannot get pretrained weights {tag!r} for {name!r}: not in the local cache and "
            f"{host or 'the download host'} is not reachable. {how}"
        )
    try:
        path = ocp.download_pretrained(cfg, cache_dir=cache_dir)
    except Exception as e:  # noqa: BLE001 - network and hub errors come in many types
        raise BackboneError(f"downloading weights {tag!r} for {name!r} failed: {e}. {how}") from e
    return path, cfg


def _cached_pretrained(cfg: dict, cache_dir: str | None) -> str | None:
    if cfg.get("file"):
        return cfg["file"] if Path(cfg["file"]).is_file() else None
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(hub)  # "org/model/" -> ("org/model", ""): the default file names
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        for fname in names:
            hit = try_to_load_from_cache(repo, fname, cache_dir=cache_dir)
            if isinstance(hit, str):
                return hit
    url = cfg.get("url", "")
    if url:
        local = Path(cache_dir or Path.home() / ".cache" / "clip") / os.path.basename(url)
        if local.is_file():
            return str(local)
    return None


def load_clip(
    name: str,
    pretrained: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    seed: int = 0,
    quick_gelu: bool | None = None,
    cache_dir: str | None = None,
) -> Backbone:
    """Load a frozen CLIP, its tokenizer and its train/test transforms.

    Args:
        name: a vladapt tiny config (``vladapt-test-tiny``) or an open_clip model name
            (``ViT-B-16``, ``ViT-B-16-quickgelu``, ...). OpenAI's weights were trained with QuickGELU:
            use the ``-quickgelu`` name with them (loading an OpenAI TorchScript archive or the
            ``openai`` tag switches to QuickGELU automatically).
        pretrained: ``None`` (the bundled weights of a bundled model such as ``vladapt-tiny``, also
            spelled ``"bundled"``; else seeded random weights), an open_clip pretrained tag, or a local file.
        device, dtype: where and in which precision the frozen weights are stored.
        seed: seed of the random weights when ``pretrained`` is ``None``.
        quick_gelu: force the activation; ``None`` follows the config / weights.
        cache_dir: open_clip's download cache.

    Every parameter of the returned model has ``requires_grad=False``; the model is in eval mode.
    """
    source = "random weights"
    sd: dict[str, Tensor] | None = None
    expected_fingerprint = None
    if name in BUNDLED_MODELS and pretrained in (None, "bundled"):
        sd, expected_fingerprint = _bundled_state_dict(name)
        source = f"bundled weights of {name!r}"
        pretrained = "bundled"
    elif pretrained is not None:
        pretrained = str(pretrained)
        if _looks_like_path(pretrained):
            sd, fmt = read_checkpoint(pretrained)
            source = f"file {pretrained!r}"
            if fmt == "torchscript" and quick_gelu is None:
                quick_gelu = True
        else:
            if name in TINY_CONFIGS:
                raise BackboneError(f"{name!r} has no pretrained tags; pass pretrained=None or a local file")
            path, pcfg = resolve_pretrained_tag(name, pretrained, cache_dir)
            if quick_gelu is None and pcfg.get("quick_gelu"):
                quick_gelu = True
            sd, _ = read_checkpoint(path)
            source = f"open_clip tag {pretrained!r}"
    cfg = _resolve_config(name, quick_gelu)
    if sd is not None and quick_gelu and name not in TINY_CONFIGS and not name.endswith("quickgelu"):
        warnings.warn(
            f"OpenAI weights need QuickGELU; building {name!r} with QuickGELU (open_clip name: {name}-quickgelu)",
            stacklevel=2,
        )
    model = CLIPModel(cfg)
    if sd is None:
        model.init_random(seed)
    else:
        load_state_dict_into(model, _strip_openai_extras(sd), source)
    model.freeze().eval()
    fingerprint = None
    if expected_fingerprint is not None or dtype != torch.float32:
        # The fingerprint names the source weights: computed before any cast to a lower precision,
        # so a checkpoint trained on a bf16 copy matches the same weights loaded in fp32.
        fingerprint = weights_fingerprint(model.state_dict())
    if expected_fingerprint is not None and fingerprint != expected_fingerprint:
        raise BackboneError(
            f"the bundled weights of {name!r} do not match their recorded fingerprint "
            f"({fingerprint} != {expected_fingerprint}); reinstall vladapt"
        )
    model.to(device=device, dtype=dtype)
    size = cfg.vision.image_size
    backbone = Backbone(
        model=model,
        tokenizer=Tokenizer(cfg.text.context_length),
        train_transform=train_transform(size),
        test_transform=test_transform(size),
        name=name,
        pretrained=pretrained,
    )
    backbone._fingerprint = fingerprint
    return backbone
