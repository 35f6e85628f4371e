"""load_clip: every source of weights, freezing, and clear errors."""

from __future__ import annotations

import time

import pytest
import torch

from reference_models import open_clip_tiny
from vladapt.backbones import load_clip, read_checkpoint
from vladapt.backbones import loader as loader_mod
from vladapt.errors import BackboneError

NAME = "vladapt-test-tiny"


def _reference_outputs(oc, images, tokens):
    with torch.no_grad():
        return oc.encode_image(images), oc.encode_text(tokens)


def _assert_matches(bb, oc, images, tokens):
    ref_img, ref_txt = _reference_outputs(oc, images, tokens)
    with torch.no_grad():
        img, txt = bb.model.encode_image(images), bb.model.encode_text(tokens)
    assert (img - ref_img).abs().max() < 1e-5
    assert (txt - ref_txt).abs().max() < 1e-5


def test_tiny_config_is_frozen_eval_and_seeded(tiny):
    assert all(not p.requires_grad for p in tiny.model.parameters())
    assert not tiny.model.training
    again = load_clip(NAME)
    assert again.fingerprint == tiny.fingerprint
    assert load_clip(NAME, seed=1).fingerprint != tiny.fingerprint
    # real architecture: CLS + 4x4 patch grid, causal text tower over CLIP's 49,408-token vocabulary
    assert tiny.model.visual.layout.grid == (4, 4)
    assert tiny.model.visual.positional_embedding.shape[0] == 17
    assert tiny.model.token_embedding.weight.shape[0] == 49408


def test_transforms_follow_backbone_size(tiny):
    from PIL import Image

    img = Image.new("L", (50, 40), color=128)  # grayscale, non-square
    assert tiny.test_transform(img).shape == (3, 32, 32)
    assert tiny.train_transform(img).shape == (3, 32, 32)


def test_plain_state_dict_file(tmp_path, images, tokens):
    oc = open_clip_tiny(seed=3)
    path = tmp_path / "weights.pt"
    torch.save(oc.state_dict(), path)
    bb = load_clip(NAME, pretrained=path)
    _assert_matches(bb, oc, images, tokens)
    assert bb.pretrained == str(path)
    assert all(not p.requires_grad for p in bb.model.parameters())


def test_nested_training_checkpoint_with_module_prefix(tmp_path, images, tokens):
    oc = open_clip_tiny(seed=4)
    path = tmp_path / "epoch_3.pt"
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in oc.state_dict().items()}}, path)
    _assert_matches(load_clip(NAME, pretrained=path), oc, images, tokens)


def test_safetensors_file(tmp_path, images, tokens):
    from safetensors.torch import save_file

    oc = open_clip_tiny(seed=5)
    path = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in oc.state_dict().items()}, str(path))
    _assert_matches(load_clip(NAME, pretrained=path), oc, images, tokens)


def test_openai_torchscript_archive(tmp_path, images, tokens):
    oc = open_clip_tiny(seed=6)
    # An OpenAI-format archive: a TorchScript module with OpenAI's key names, fp16 weights and the
    # scalar entries OpenAI's archives carry.
    del oc.context_length, oc.vocab_size
    oc.register_buffer("input_resolution", torch.tensor(32))
    oc.register_buffer("context_length", torch.tensor(77))
    oc.register_buffer("vocab_size", torch.tensor(49408))
    scripted = torch.jit.script(oc.half())
    oc.float()
    path = tmp_path / "ViT-tiny.pt"
    scripted.save(str(path))
    sd, fmt = read_checkpoint(path)
    assert fmt == "torchscript"
    _assert_matches(load_clip(NAME, pretrained=path), oc, images, tokens)


def test_open_clip_create_model_fails_on_torchscript_but_we_load_it(tmp_path, images, tokens):
    # The reason for vladapt's own reader: open_clip.create_model(..., pretrained=<archive>) goes
    # through torch.load, whose weights_only default rejects TorchScript archives.
    import json

    import open_clip

    from reference_models import TINY_TEXT, TINY_VISION

    oc = open_clip_tiny(seed=7)
    path = tmp_path / "archive.pt"
    torch.jit.script(oc).save(str(path))
    cfg = tmp_path / "vladapt-tiny-reference.json"
    cfg.write_text(json.dumps({"embed_dim": 64, "quick_gelu": True, "vision_cfg": TINY_VISION, "text_cfg": TINY_TEXT}))
    open_clip.add_model_config(str(cfg))
    with pytest.raises(RuntimeError, match="weights_only"):
        open_clip.create_model("vladapt-tiny-reference", pretrained=str(path))
    _assert_matches(load_clip(NAME, pretrained=path), oc, images, tokens)


def test_missing_file_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope" / "ViT-B-16.pt"
    with pytest.raises(BackboneError, match="does not exist") as e:
        load_clip(NAME, pretrained=missing)
    assert str(missing) in str(e.value)


def test_arbitrary_pickle_is_refused(tmp_path):
    import collections

    path = tmp_path / "evil.pt"
    torch.save({"weights": collections.Counter(a=1), "fn": print}, path)
    with pytest.raises(BackboneError, match="never unpickles"):
        load_clip(NAME, pretrained=path)


def test_wrong_architecture_names_keys(tmp_path):
    oc = open_clip_tiny()
    sd = oc.state_dict()
    sd["visual.proj"] = torch.zeros(128, 32)
    del sd["ln_final.weight"]
    path = tmp_path / "bad.pt"
    torch.save(sd, path)
    with pytest.raises(BackboneError) as e:
        load_clip(NAME, pretrained=path)
    msg = str(e.value)
    assert "ln_final.weight" in msg and "visual.proj" in msg and "bad.pt" in msg


def test_unknown_backbone_name():
    with pytest.raises(BackboneError, match="unknown backbone 'ViT-Q-99'"):
        load_clip("ViT-Q-99")


def test_unsupported_open_clip_architecture_is_named():
    with pytest.raises(BackboneError, match="RN50"):
        load_clip("RN50")


def test_offline_tag_fails_fast_and_says_how(monkeypatch, tmp_path):
    monkeypatch.setattr(loader_mod, "_host_reachable", lambda host, timeout=3.0: False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    t0 = time.perf_counter()
    with pytest.raises(BackboneError) as e:
        load_clip("ViT-B-16", pretrained="openai", cache_dir=str(tmp_path))
    assert time.perf_counter() - t0 < 5
    msg = str(e.value)
    assert "'ViT-B-16'" in msg and "'openai'" in msg and "pretrained=" in msg


def test_unknown_tag_lists_known_ones():
    with pytest.raises(BackboneError, match="openai"):
        load_clip("ViT-B-16", pretrained="not-a-tag")


def test_bf16_storage_runs_and_agrees_with_fp32(tiny, images, tokens):
    bb16 = load_clip(NAME, dtype=torch.bfloat16)
    assert bb16.model.visual.conv1.weight.dtype == torch.bfloat16
    assert bb16.fingerprint == tiny.fingerprint  # names the source weights, whatever the storage precision
    with torch.no_grad():
        a = torch.nn.functional.cosine_similarity(bb16.model.encode_image(images).float(), tiny.model.encode_image(images), dim=-1)
        b = torch.nn.functional.cosine_similarity(bb16.model.encode_text(tokens).float(), tiny.model.encode_text(tokens), dim=-1)
    assert a.min() > 0.98 and b.min() > 0.98
