"""Zero-shot CLIP: templates, the cached text classifier and accuracy on a folder with a known answer."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vladapt.data import ImageDataset
from vladapt.data.custom import load_custom
from vladapt.engine import evaluate
from vladapt.errors import ConfigError
from vladapt.methods import create_method
from vladapt.methods.templates import dataset_template, resolve_templates

COLORS = {"red": (230, 20, 20), "green": (20, 230, 20), "blue": (20, 20, 230)}


def color_folder(root, per_class=4):
    for name, rgb in COLORS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (40 + i, 36), rgb).save(root / name / f"{i}.png")
    return root


def patch_color_features(monkeypatch, tiny):
    """Text feature of a prompt = one-hot of the colour word it contains; image feature = mean colour.
    With these, the correct answer for every image is known."""
    ids = {tiny.tokenizer([c])[0, 1].item(): i for i, c in enumerate(COLORS)}
    calls = []

    def encode_text(tokens, ctx=None, normalize=False):
        calls.append(len(tokens))
        out = torch.zeros(len(tokens), 64)
        for row, t in enumerate(tokens.tolist()):
            hits = [ids[i] for i in t if i in ids]
            out[row, hits[0]] = 1.0
        return out

    def encode_image(images, ctx=None, normalize=False):
        out = torch.zeros(len(images), 64)
        out[:, :3] = images.mean(dim=(2, 3))
        return out

    monkeypatch.setattr(tiny.model, "encode_text", encode_text)
    monkeypatch.setattr(tiny.model, "encode_image", encode_image)
    return calls


def test_zero_shot_accuracy_on_folder_with_known_answer(tmp_path, monkeypatch, tiny):
    splits = load_custom(color_folder(tmp_path / "colors"), save_split=False)
    items = splits.train + splits.val + splits.test
    assert splits.classnames == ["blue", "green", "red"]
    patch_color_features(monkeypatch, tiny)
    loader = DataLoader(ImageDataset(items, splits.image_root, tiny.test_transform), batch_size=5)

    right = create_method("zeroshot", tiny, splits.classnames)
    res = evaluate(right, loader, 3, progress=False)
    assert (res.accuracy, res.correct, res.total) == (100.0, 12, 12)
    assert res.per_class_total == [4, 4, 4]

    rotated = create_method("zeroshot", tiny, ["green", "red", "blue"])  # every name on the wrong label
    res = evaluate(rotated, loader, 3, progress=False)
    assert (res.accuracy, res.correct) == (0.0, 0)


def test_text_classifier_is_cached_and_invalidated(monkeypatch, tiny):
    calls = patch_color_features(monkeypatch, tiny)
    zs = create_method("zeroshot", tiny, ["red", "green"], {"templates": ["a photo of a {}.", "a {} thing."]})
    w = zs.text_classifier()
    assert w.shape == (2, 64) and len(calls) == 2  # one batch per template
    assert torch.allclose(w.norm(dim=-1), torch.ones(2))
    zs.text_classifier()
    assert len(calls) == 2  # cached
    zs.set_classnames(["red", "green", "blue"])
    assert zs.text_classifier().shape == (3, 64) and len(calls) == 4  # class names changed
    zs.set_templates("a drawing of a {}.")
    zs.text_classifier()
    assert len(calls) == 5  # templates changed
    with torch.no_grad():
        tiny.model.ln_final.weight.mul_(1.0)  # an in-place update, e.g. an optimizer step
    zs.text_classifier()
    assert len(calls) == 6  # weights changed


def test_template_ensemble_is_the_mean_of_normalized_features(tiny):
    zs = create_method("zeroshot", tiny, ["cat", "dog"], {"templates": ["a photo of a {}.", "art of the {}."]})
    per_t = []
    for t in zs.templates:
        tok = tiny.tokenizer([t.format(c) for c in zs.classnames])
        with torch.no_grad():
            per_t.append(torch.nn.functional.normalize(tiny.model.encode_text(tok), dim=-1))
    expected = torch.nn.functional.normalize(sum(per_t) / 2, dim=-1)
    assert torch.allclose(zs.text_classifier(), expected, atol=1e-6)


def test_templates():
    assert dataset_template("eurosat") == "a centered satellite photo of {}."
    assert dataset_template("dtd") == "{} texture."
    assert dataset_template("my_folder") == "a photo of a {}."
    assert len(resolve_templates("openai_imagenet")) == 80
    assert resolve_templates("dataset", "oxford_pets") == ["a photo of a {}, a type of pet."]
    with pytest.raises(ConfigError, match="exactly one"):
        resolve_templates("a photo")
    with pytest.raises(ConfigError, match="unknown method"):
        create_method("nope", None, [])


def test_underscores_become_spaces(monkeypatch, tiny):
    seen = []
    real = tiny.tokenizer

    class Spy:
        def __call__(self, texts):
            seen.extend(texts)
            return real(texts)

    monkeypatch.setattr(tiny, "tokenizer", Spy())
    create_method("zeroshot", tiny, ["Apply_Eye_Makeup"], {"dataset": "ucf101"}).text_classifier()
    assert seen == ["a photo of a person doing Apply Eye Makeup."]
