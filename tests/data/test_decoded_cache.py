"""The decoded-image cache: bit-identical tensors, hits without decoding, invalidation, torn entries,
unsupported transforms and evaluation through the protocol runner."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from vladapt.backbones import transforms
from vladapt.data import DatasetSplits, ImageDataset
from vladapt.data import dataset as dataset_module
from vladapt.data.base import Datum
from vladapt.data.decoded import (
    UnsupportedTransform,
    decoded_images,
    entry_paths,
    evaluation_loader,
    image_cache_option,
    split_transform,
)
from vladapt.errors import DataError

# (file, width, height, PIL mode): JPEG and PNG, RGB, RGBA, grayscale and palette, smaller and larger
# than the crop, portrait and landscape
IMAGES = [
    ("a.jpg", 50, 40, "RGB"),
    ("b.png", 33, 77, "RGBA"),
    ("c.png", 64, 64, "L"),
    ("d.png", 100, 30, "RGB"),
    ("e.png", 20, 20, "P"),
    ("f.jpg", 17, 90, "L"),
    ("sub/g.png", 120, 90, "RGB"),
]


def _write(path: Path, width: int, height: int, mode: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    smooth = rng.integers(0, 256, (height // 4 + 1, width // 4 + 1, 4), dtype=np.uint8)
    pixels = np.kron(smooth, np.ones((4, 4, 1), np.uint8))[:height, :width]  # blocks: JPEG keeps some structure
    pixels = pixels ^ rng.integers(0, 32, pixels.shape, dtype=np.uint8)
    img = Image.fromarray(pixels, "RGBA")
    img = img.convert("RGB").convert("P") if mode == "P" else img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


@pytest.fixture
def folder(tmp_path) -> tuple[Path, list[Datum]]:
    root = tmp_path / "images"
    items = []
    for i, (name, w, h, mode) in enumerate(IMAGES):
        _write(root / name, w, h, mode, seed=i)
        items.append(Datum(path=name, label=i % 3, classname=f"class{i % 3}"))
    return root, items


def reference(items, root, transform) -> torch.Tensor:
    ds = ImageDataset(items, root, transform)
    return torch.stack([ds[i][0] for i in range(len(ds))])


def read_all(images, batch_size: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*images.loader(batch_size))
    return torch.cat(xs), torch.cat(ys)


@pytest.mark.parametrize("size", [24, 64])
def test_tensors_are_bit_identical_to_image_dataset(folder, tmp_path, size):
    root, items = folder
    transform = transforms.test_transform(size)
    want = reference(items, root, transform)
    first = decoded_images(items, root, transform, tmp_path / "cache", progress=False)
    second = decoded_images(items, root, transform, tmp_path / "cache", progress=False)
    assert first.built and not second.built
    for images in (first, second):
        x, y = read_all(images)
        assert x.dtype == want.dtype and x.shape == want.shape == (len(items), 3, size, size)
        assert torch.equal(x, want)
        assert y.tolist() == [d.label for d in items]
    # another normalization is the tensor stage only: the same entry, still bit-identical
    other = transforms.test_transform(size, mean=(0.5, 0.25, 0.125), std=(0.2, 0.3, 0.4))
    third = decoded_images(items, root, other, tmp_path / "cache", progress=False)
    assert not third.built
    assert torch.equal(read_all(third)[0], reference(items, root, other))
    # no Normalize at all: ToTensor's [0, 1] values
    plain = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), T.ToTensor()])
    assert torch.equal(read_all(decoded_images(items, root, plain, tmp_path / "cache", progress=False))[0],
                       reference(items, root, plain))


def test_build_with_loader_workers_gives_the_same_entry(folder, tmp_path):
    root, items = folder
    transform = transforms.test_transform(24)
    built = decoded_images(items, root, transform, tmp_path / "cache", workers=2, progress=False)
    assert built.built and torch.equal(read_all(built)[0], reference(items, root, transform))


def test_a_hit_decodes_nothing(folder, tmp_path, monkeypatch):
    root, items = folder
    transform = transforms.test_transform(24)
    decoded_images(items, root, transform, tmp_path / "cache", progress=False)
    want = reference(items, root, transform)

    def no_decoding(*args, **kwargs):
        raise AssertionError("an image was opened on a cache hit")

    monkeypatch.setattr(Image, "open", no_decoding)
    monkeypatch.setattr(dataset_module, "load_image", no_decoding)
    hit = decoded_images(items, root, transform, tmp_path / "cache", progress=False)
    assert not hit.built
    assert torch.equal(read_all(hit, batch_size=4)[0], want)


def test_a_changed_image_file_gives_a_new_entry(folder, tmp_path):
    root, items = folder
    transform = transforms.test_transform(24)
    old = decoded_images(items, root, transform, tmp_path / "cache", progress=False)
    target = root / items[3].path
    _write(target, 100, 30, "RGB", seed=99)  # other pixels, same size on disk is not relied on
    st = os.stat(target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a new key, not a rebuilt entry
        new = decoded_images(items, root, transform, tmp_path / "cache", progress=False)
    assert new.built and new.path != old.path
    want = reference(items, root, transform)
    got = read_all(new)[0]
    assert torch.equal(got, want)
    assert not torch.equal(read_all(old)[0][3], got[3])  # the stale entry is left alone, and not read


def test_a_changed_transform_size_gives_a_new_entry(folder, tmp_path):
    root, items = folder
    cache = tmp_path / "cache"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # each size has its own key: no entry is ever rebuilt
        small = decoded_images(items, root, transforms.test_transform(24), cache, progress=False)
        large = decoded_images(items, root, transforms.test_transform(32), cache, progress=False)
        assert small.built and large.built and small.path != large.path
        assert not decoded_images(items, root, transforms.test_transform(24), cache, progress=False).built
        assert not decoded_images(items, root, transforms.test_transform(32), cache, progress=False).built
    assert torch.equal(read_all(large)[0], reference(items, root, transforms.test_transform(32)))
    # the interpolation is part of the key too
    bilinear = T.Compose([T.Resize(24, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(24), T.ToTensor()])
    other = decoded_images(items, root, bilinear, cache, progress=False)
    assert other.built and torch.equal(read_all(other)[0], reference(items, root, bilinear))



def test_another_pillow_version_gives_a_new_entry(folder, tmp_path, monkeypatch):
    import PIL

    root, items = folder
    first = decoded_images(items, root, transforms.test_transform(24), tmp_path / "cache", progress=False)
    monkeypatch.setattr(PIL, "__version__", PIL.__version__ + ".post1")  # resampling may differ between releases
    again = decoded_images(items, root, transforms.test_transform(24), tmp_path / "cache", progress=False)
    assert again.built and again.path != first.path


@pytest.mark.parametrize("damage", ["truncated", "extended", "no header"])
def test_a_torn_data_file_is_detected_and_rebuilt(folder, tmp_path, damage):
    root, items = folder
    transform = transforms.test_transform(24)
    first = decoded_images(items, root, transform, tmp_path / "cache", progress=False)
    data, header = entry_paths(tmp_path / "cache", first.path.stem)
    size = data.stat().st_size
    del first
    if damage == "truncated":
        os.truncate(data, size - 100)
    elif damage == "extended":
        with open(data, "ab") as f:
            f.write(b"\0" * 7)
    else:
        header.unlink()
    with pytest.warns(UserWarning, match=data.stem):
        again = decoded_images(items, root, transform, tmp_path / "cache", progress=False)
    assert again.built
    assert data.stat().st_size == size and header.is_file()
    assert torch.equal(read_all(again)[0], reference(items, root, transform))


@pytest.mark.parametrize("header_text", ["{not json", '{"format": "vladapt-decoded-images"}', "[]", "\xff\xfe"])
def test_a_corrupt_header_is_detected_and_rebuilt(folder, tmp_path, header_text):
    root, items = folder
    transform = transforms.test_transform(24)
    first = decoded_images(items, root, transform, tmp_path / "cache", progress=False)
    data, header = entry_paths(tmp_path / "cache", first.path.stem)
    header.write_text(header_text, encoding="latin-1")
    with pytest.warns(UserWarning, match=header.name):
        again = decoded_images(items, root, transform, tmp_path / "cache", progress=False)
    assert again.built
    meta = json.loads(header.read_text(encoding="utf-8"))
    assert meta["key"] == data.stem and meta["shape"] == [len(items), 24, 24, 3]
    assert torch.equal(read_all(again)[0], reference(items, root, transform))


def test_a_header_of_another_shape_is_not_used(folder, tmp_path):
    root, items = folder
    transform = transforms.test_transform(24)
    first = decoded_images(items, root, transform, tmp_path / "cache", progress=False)
    data, header = entry_paths(tmp_path / "cache", first.path.stem)
    meta = json.loads(header.read_text(encoding="utf-8"))
    meta["shape"] = [len(items), 12, 48, 3]  # the same byte count, another layout
    header.write_text(json.dumps(meta), encoding="utf-8")
    with pytest.warns(UserWarning, match="shape"):
        assert decoded_images(items, root, transform, tmp_path / "cache", progress=False).built


def test_a_failed_build_leaves_no_file(folder, tmp_path, monkeypatch):
    root, items = folder
    cache = tmp_path / "cache"
    real = dataset_module.load_image
    calls = []

    def failing(path):
        calls.append(path)
        if len(calls) == 4:
            raise DataError(f"cannot read image {path}: broken on purpose")
        return real(path)

    monkeypatch.setattr(dataset_module, "load_image", failing)
    with pytest.raises(DataError, match="broken on purpose"):
        decoded_images(items, root, transforms.test_transform(24), cache, progress=False)
    assert [p for p in cache.rglob("*") if p.is_file()] == []  # no data file, no header, no temporary file
    monkeypatch.setattr(dataset_module, "load_image", real)
    assert decoded_images(items, root, transforms.test_transform(24), cache, progress=False).built


def test_a_missing_image_is_a_data_error_naming_it(folder, tmp_path):
    root, items = folder
    (root / items[2].path).unlink()
    with pytest.raises(DataError, match="c.png"):
        decoded_images(items, root, transforms.test_transform(24), tmp_path / "cache", progress=False)


def test_transforms_the_cache_cannot_split_are_clear_errors():
    with pytest.raises(UnsupportedTransform, match="RandomResizedCrop.*random"):
        split_transform(transforms.train_transform(24))
    with pytest.raises(UnsupportedTransform, match="fixed image size"):
        split_transform(T.Compose([T.Resize(24), T.ToTensor()]))  # the size depends on the aspect ratio
    with pytest.raises(UnsupportedTransform, match="does not know"):
        split_transform(T.Compose([T.CenterCrop(24), T.Lambda(lambda x: x), T.ToTensor()]))

    class MyCrop(T.CenterCrop):  # a subclass may do anything: not treated as CenterCrop
        pass

    with pytest.raises(UnsupportedTransform, match="MyCrop.*does not know"):
        split_transform(T.Compose([MyCrop(24), T.ToTensor()]))
    with pytest.raises(UnsupportedTransform, match="ToTensor"):
        split_transform(T.Compose([T.CenterCrop(24)]))
    pil, tensor = split_transform(transforms.test_transform(24))
    assert pil.size == (24, 24) and "Resize" in repr(pil) and "Normalize" in repr(tensor)


def test_evaluation_loader_falls_back_with_one_warning(folder, tmp_path, monkeypatch):
    from vladapt.data import decoded

    monkeypatch.setattr(decoded, "_warned", set())
    root, items = folder
    with pytest.warns(UserWarning, match="RandomResizedCrop.*decoding the images instead"):
        assert evaluation_loader(items, root, transforms.train_transform(24), tmp_path / "cache", 4, progress=False) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        assert evaluation_loader(items, root, transforms.train_transform(24), tmp_path / "cache", 4, progress=False) is None
    assert not (tmp_path / "cache").exists()
    loader = evaluation_loader(items, root, transforms.test_transform(24), tmp_path / "cache", 4, progress=False)
    assert len(loader) == 2 and [len(y) for _, y in loader] == [4, 3]
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    with pytest.warns(UserWarning, match=f"cannot write the decoded-image cache in {not_a_folder}.*decoding the images"):
        assert evaluation_loader(items, root, transforms.test_transform(24), not_a_folder, 4, progress=False) is None


def test_image_cache_option():
    assert image_cache_option(None) is None
    assert image_cache_option("none") is None and image_cache_option("OFF") is None
    assert image_cache_option("some/dir") == Path("some/dir")


def test_cli_passes_image_cache_to_the_run_settings(tmp_path):
    from vladapt.cli import _settings, build_parser

    parser = build_parser()
    base = ["eval", "--protocol", "fewshot", "--dataset", "folder", "--root", str(tmp_path)]
    assert _settings(parser.parse_args(base), None, "zeroshot", {}).image_cache is None
    args = parser.parse_args([*base, "--image-cache", str(tmp_path / "c")])
    assert _settings(args, None, "zeroshot", {}).image_cache == tmp_path / "c"
    args = parser.parse_args([*base, "--image-cache", "none"])
    assert _settings(args, None, "zeroshot", {}).image_cache is None
    for command in (["train", "--method", "coop", *base[1:]], ["demo"], ["bench"]):
        assert parser.parse_args([*command, "--image-cache", "x"]).image_cache == "x"


def test_evaluation_with_and_without_the_cache_is_identical(folder, tmp_path, monkeypatch):
    from vladapt.backbones import load_clip
    from vladapt.methods import create_method
    from vladapt.protocols.runner import RunSettings, evaluate_items

    root, items = folder
    items = items * 3  # 21 images, batches of 8: a short last batch
    backbone = load_clip("vladapt-tiny")
    classnames = ["red square", "green circle", "blue star"]
    splits = DatasetSplits(name="fixture", image_root=root, train=[], val=[], test=items, classnames=classnames)
    method = create_method("zeroshot", backbone, classnames)
    settings = RunSettings(backbone=backbone, root=root, method="zeroshot", batch_size=8, progress=False)

    plain = evaluate_items(settings, method, splits, "fixture", "plain")
    cached = RunSettings(backbone=backbone, root=root, method="zeroshot", batch_size=8, progress=False,
                         image_cache=tmp_path / "cache")
    built = evaluate_items(cached, method, splits, "fixture", "build")
    assert list((tmp_path / "cache").rglob("*.u8"))
    monkeypatch.setattr(dataset_module, "load_image", lambda path: pytest.fail(f"decoded {path} on a hit"))
    hit = evaluate_items(cached, method, splits, "fixture", "hit")
    assert plain == built == hit
    assert plain["total"] == len(items)

    # the same logits, batch by batch
    loader = evaluation_loader(items, root, backbone.test_transform, tmp_path / "cache", 8, progress=False)
    monkeypatch.undo()  # ImageDataset decodes again
    ds = ImageDataset(items, root, backbone.test_transform)
    with torch.no_grad():
        for b, (x, y) in enumerate(loader):
            ref = torch.stack([ds[i][0] for i in range(b * 8, b * 8 + len(y))])
            assert torch.equal(x, ref)
            assert torch.equal(method(x), method(ref))


def test_bench_jobs_carry_an_absolute_image_cache(tmp_path, monkeypatch):
    from vladapt.bench.bench import make_spec, plan

    monkeypatch.chdir(tmp_path)
    values = {"methods": ["zeroshot"], "datasets": ["folder"], "protocols": ["fewshot"], "root": "data"}
    assert {job.image_cache for job in plan(make_spec(values))[0]} == {None}
    jobs, _ = plan(make_spec({**values, "image_cache": "cache"}))
    assert jobs and {job.image_cache for job in jobs} == {str(tmp_path / "cache")}
    assert {job.image_cache for job in plan(make_spec({**values, "image_cache": "none"}))[0]} == {"none"}
