"""`vladapt predict` and `vladapt.Predictor`: a trained run's checkpoint classifies image files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from test_heba_engine import NAMES as COLOR_NAMES
from test_heba_engine import color_folder
from vladapt import Predictor
from vladapt.cli import main
from vladapt.errors import ConfigError, DataError
from vladapt.predict import expand_inputs, open_rgb

NAMES = sorted(COLOR_NAMES)  # the folder reader orders classes by name


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A HeBA run of `vladapt train` on a generated colour folder (fewshot, 2 shots, 1 epoch)."""
    tmp = tmp_path_factory.mktemp("predict")
    data = color_folder(tmp / "colors", per_class=6)
    out = tmp / "runs"
    assert main(["train", "--method", "heba", "--protocol", "fewshot", "--dataset", "folder", "--root", str(data),
                 "--model", "vladapt-test-tiny", "--shots", "2", "--out", str(out), "--quiet",
                 "train.epochs=1", "train.batch_size=4", "method.scale=0.5"]) == 0
    (run_dir,) = [p for p in (out / "fewshot" / "heba").glob("*/shots_2-seed_1") if p.is_dir()]
    return run_dir, data


def reference_probabilities(run_dir, paths, classes=None, split="base"):
    """The checkpoint loaded by hand into a HeBA built from its sidecar; images through the test transform."""
    from vladapt.backbones import load_clip
    from vladapt.engine.checkpoint import load_checkpoint, read_meta
    from vladapt.methods import create_method

    meta = read_meta(run_dir)
    bb = load_clip("vladapt-test-tiny")
    m = create_method("heba", bb, meta["classnames"], meta["method_config"])
    load_checkpoint(run_dir, m, bb.fingerprint)
    m.set_classnames(classes or meta["classnames"], split=split)
    m.eval()
    x = torch.stack([bb.test_transform(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        return torch.softmax(m(x).double(), dim=-1)


def test_predictions_equal_the_checkpointed_method(trained):
    run_dir, data = trained
    paths = sorted((data / NAMES[0]).glob("*.png"))[:3] + sorted((data / NAMES[2]).glob("*.png"))[:2]
    predictor = Predictor.from_checkpoint(run_dir, batch_size=2)  # batches of 2 over 5 images
    assert predictor.classes == NAMES and predictor.source["method"] == "heba"
    result = predictor.predict(paths, top_k=len(NAMES))
    ref = reference_probabilities(run_dir, paths)
    assert [p["image"] for p in result.predictions] == [str(p) for p in paths]
    for p, r in zip(result.predictions, ref):
        classes, probs = zip(*p["top"])
        assert list(probs) == sorted(probs, reverse=True)
        order = r.argsort(descending=True)
        assert list(classes) == [NAMES[i] for i in order]
        assert torch.allclose(torch.tensor(probs, dtype=torch.float64), r[order], atol=1e-5)
    # top-k keeps the k largest
    top2 = predictor.predict(paths[:1], top_k=2).predictions[0]["top"]
    assert [c for c, _ in top2] == [c for c, _ in result.predictions[0]["top"][:2]]
    assert np.allclose([q for _, q in top2], [q for _, q in result.predictions[0]["top"][:2]], atol=1e-6)


def test_new_class_names_at_predict_time(trained):
    run_dir, data = trained
    paths = sorted((data / NAMES[1]).glob("*.png"))[:2]
    new = ["crimson thing", "azure thing", "emerald thing"]
    predictor = Predictor.from_checkpoint(run_dir, classes=new)
    assert predictor.classes == new and predictor.method.split == "new"  # evaluated as base-to-new's new classes
    probs = [dict(p["top"]) for p in predictor.predict(paths, top_k=3).predictions]
    ref = reference_probabilities(run_dir, paths, new, split="new")
    for p, r in zip(probs, ref):
        assert np.allclose([p[c] for c in new], r.numpy(), atol=1e-5)
    # an inference setting of the checkpoint's config can be changed: new classes at scale 0 are zero-shot HeBA
    plain = Predictor.from_checkpoint(run_dir, classes=new, method_config={"new_eval_scale": 0.0})
    assert plain.method.config.new_eval_scale == 0.0 and predictor.method.config.new_eval_scale != 0.0
    zero = [dict(p["top"]) for p in plain.predict(paths, top_k=3).predictions]
    assert not np.allclose([zero[0][c] for c in new], [probs[0][c] for c in new], atol=1e-4)
    predictor.set_classes(NAMES)
    assert predictor.method.split == "base"
    with pytest.raises(ConfigError, match="unique"):
        predictor.set_classes(["a", "a"])
    predictor.method.unseen_classes = False  # a cache or linear probe: only its own classes
    with pytest.raises(ConfigError, match="only the classes it was fitted on; unknown: \\['zebra'\\]"):
        predictor.set_classes([NAMES[0], "zebra"])


def test_image_modes_exif_and_size_guard(tmp_path):
    rgb = np.zeros((10, 20, 3), np.uint8)
    rgb[:, :10] = (255, 0, 0)
    rgb[:, 10:] = (0, 0, 255)
    img = Image.fromarray(rgb)
    # EXIF orientation 6: the stored 20 x 10 image is shown rotated to 10 x 20
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    assert open_rgb(tmp_path / "rotated.jpg").size == (10, 20)
    # grayscale, palette, CMYK: RGB of the same size
    img.convert("L").save(tmp_path / "gray.png")
    img.convert("P").save(tmp_path / "palette.png")
    img.convert("CMYK").save(tmp_path / "cmyk.jpg")
    for name in ("gray.png", "palette.png", "cmyk.jpg"):
        out = open_rgb(tmp_path / name)
        assert out.mode == "RGB" and out.size == (20, 10), name
    # 16-bit grayscale: full scale maps to 255, half scale to 128
    a16 = np.full((4, 4), 65535, np.uint16)
    a16[:2] = 32896
    Image.fromarray(a16).save(tmp_path / "deep.png")
    px = np.asarray(open_rgb(tmp_path / "deep.png"))
    assert px.shape == (4, 4, 3) and px[3, 0, 0] == 255 and px[0, 0, 0] == 128
    # transparency goes on white, not black
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255  # red, fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "clear.png")
    assert tuple(np.asarray(open_rgb(tmp_path / "clear.png"))[0, 0]) == (255, 255, 255)
    # the size guard reads the header only
    with pytest.raises(DataError, match="gray.png has 20 x 10 pixels, above the limit of 100"):
        open_rgb(tmp_path / "gray.png", max_pixels=100)
    # unreadable and missing files name themselves
    (tmp_path / "broken.png").write_bytes((tmp_path / "gray.png").read_bytes()[:40])
    with pytest.raises(DataError, match="broken.png"):
        open_rgb(tmp_path / "broken.png")
    with pytest.raises(DataError, match="nothing.png not found"):
        open_rgb(tmp_path / "nothing.png")


def test_inputs_from_folders_and_csv_lists(tmp_path):
    for rel in ("a/1.png", "a/b/2.jpg", "c.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(tmp_path / rel)
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    assert expand_inputs([tmp_path / "a"]) == [tmp_path / "a" / "1.png", tmp_path / "a" / "b" / "2.jpg"]
    (tmp_path / "list.csv").write_text("label,path\nx,c.png\ny,a/1.png\n")
    assert expand_inputs([tmp_path / "list.csv"]) == [tmp_path / "c.png", tmp_path / "a" / "1.png"]
    (tmp_path / "bare.csv").write_text("c.png\n")
    assert expand_inputs([tmp_path / "bare.csv"]) == [tmp_path / "c.png"]
    with pytest.raises(DataError, match="holds no image files"):
        expand_inputs([_empty(tmp_path)])
    with pytest.raises(DataError, match="does not exist"):
        expand_inputs([tmp_path / "missing_dir"])


def _empty(tmp_path):
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


def test_cli_predict_writes_json_and_csv_and_skips_bad_images(trained, tmp_path, capsys):
    run_dir, data = trained
    folder = data / NAMES[3]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = tmp_path / "pred.json"
    assert main(["predict", "--checkpoint", str(run_dir), str(folder), "--top-k", "2", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    doc = json.loads(out.read_text())
    n = len(list(folder.glob("*.png")))
    assert len(doc["predictions"]) == n and doc["skipped"] == [] and doc["classes"] == NAMES
    assert all(len(p["top"]) == 2 and p["top"][0]["probability"] >= p["top"][1]["probability"]
               for p in doc["predictions"])
    assert f"{n} predictions written to {out}" in printed
    # a bad image: an error naming it (default), or skipped and reported
    assert main(["predict", "--checkpoint", str(run_dir), str(bad), str(folder)]) == 2
    assert "bad.png" in capsys.readouterr().err
    csv_out = tmp_path / "pred.csv"
    assert main(["predict", "--checkpoint", str(run_dir), str(bad), str(folder), "--on-bad-image", "skip",
                 "--output", str(csv_out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "skipped 1 unreadable image(s)" in err and "bad.png" in err
    lines = csv_out.read_text().splitlines()
    assert lines[0].startswith("image,class_1,probability_1") and len(lines) == n + 1
    # zero-shot needs only class names; bad arguments are one-line errors
    assert main(["predict", "--zeroshot", "--model", "vladapt-test-tiny", "--classes", "red,green", str(folder),
                 "--quiet", "--output", str(tmp_path / "zs.json")]) == 0
    assert json.loads((tmp_path / "zs.json").read_text())["classes"] == ["red", "green"]
    assert main(["predict", "--checkpoint", str(run_dir), str(folder), "--set", "train.lr=1"]) == 2
    assert "--set takes method.KEY=VALUE" in capsys.readouterr().err
    assert main(["predict", "--zeroshot", str(folder)]) == 2
    assert "--zeroshot needs class names" in capsys.readouterr().err
    assert main(["predict", "--checkpoint", str(run_dir), str(folder), "--output", str(tmp_path / "p.txt")]) == 2
    assert "give a .csv or .json file name" in capsys.readouterr().err
    assert main(["predict", "--checkpoint", str(tmp_path), str(folder)]) == 2
    assert "not a vladapt run directory" in capsys.readouterr().err
