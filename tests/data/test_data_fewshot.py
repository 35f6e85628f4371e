"""Few-shot sampling against an independent Dassl-style reference, and the JSON cache."""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
from datafixtures import Expected, build_benchmark_root, shared_splits_dir
from hypothesis import given, settings
from hypothesis import strategies as st

from vladapt.data import (
    DatasetSplits,
    Datum,
    fewshot_splits,
    load_dataset,
    sample_fewshot,
)
from vladapt.data.splitfile import read_split_file
from vladapt.errors import DataError


@pytest.fixture(scope="module")
def bench_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Expected]]:
    return build_benchmark_root(tmp_path_factory.mktemp("data_root"))


@pytest.fixture
def global_random() -> Iterator[None]:
    """Let a test seed the global ``random`` like Dassl does, then restore it."""
    state = random.getstate()
    yield
    random.setstate(state)


def dassl_reference(train: list[Datum], val: list[Datum], num_shots: int, seed: int) -> tuple[list, list]:
    """The documented algorithm (spec/METHODS.md §5.3), written against the global ``random``."""
    random.seed(seed)
    out = []
    for source, k in ((train, num_shots), (val, min(num_shots, 4))):
        by_label = defaultdict(list)
        for item in source:
            by_label[item.label].append(item)
        picked = []
        for items in by_label.values():
            picked += random.sample(items, k) if len(items) >= k else random.choices(items, k=k)
        out.append(picked)
    return out[0], out[1]


def generated_splits(sizes: dict[int, int], val_size: int = 3) -> DatasetSplits:
    """Classes appear in an unsorted order and with uneven sizes (some below K)."""
    train = [Datum(f"c{label}/{i}.jpg", label, f"class{label}") for i in range(max(sizes.values()))
             for label, n in sizes.items() if i < n]  # fmt: skip
    val = [Datum(f"c{label}/v{i}.jpg", label, f"class{label}") for label in sizes for i in range(val_size)]
    test = [Datum(f"c{label}/t.jpg", label, f"class{label}") for label in sizes]
    return DatasetSplits("gen", Path("."), train, val, test, [f"class{i}" for i in range(len(sizes))])


SIZES = {3: 20, 0: 16, 4: 2, 1: 9, 2: 1}  # label -> train items; first appearance order 3, 0, 4, 1, 2


@pytest.mark.parametrize("num_shots", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_matches_dassl_reference_on_generated_split(num_shots: int, seed: int, global_random: None) -> None:
    splits = generated_splits(SIZES)
    got = fewshot_splits(splits, num_shots, seed)
    ref_train, ref_val = dassl_reference(splits.train, splits.val, num_shots, seed)
    assert got.train == ref_train
    assert got.val == ref_val
    assert got.test == splits.test
    assert [d.label for d in got.train[::num_shots]] == [3, 0, 4, 1, 2]  # first-appearance order
    assert len(got.train) == num_shots * len(SIZES)  # small classes are topped up with repeats


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.dictionaries(st.integers(0, 30), st.integers(1, 12), min_size=1, max_size=8),
    val_size=st.integers(0, 5),
    num_shots=st.integers(1, 10),
    seed=st.integers(0, 2**32 - 1),
)
def test_matches_dassl_reference_for_any_class_sizes(
    sizes: dict[int, int], val_size: int, num_shots: int, seed: int
) -> None:
    # Labels need not be contiguous here: the sampler only groups by label.
    splits = generated_splits(sizes, val_size)
    state = random.getstate()
    try:
        expected = dassl_reference(splits.train, splits.val, num_shots, seed)
    finally:
        random.setstate(state)
    got = fewshot_splits(splits, num_shots, seed)
    assert (got.train, got.val) == expected


def test_small_class_draws_with_replacement() -> None:
    group = [Datum("a.jpg", 0, "a"), Datum("b.jpg", 0, "a")]
    drawn = sample_fewshot(group, 5, random.Random(0))
    expected = random.Random(0).choices(group, k=5)
    assert drawn == expected and len(set(drawn)) <= 2
    assert sample_fewshot(group, 5, random.Random(0), repeat=False) == group


def test_no_shots_means_all_data() -> None:
    splits = generated_splits(SIZES)
    for shots in (None, 0, -1):
        got = fewshot_splits(splits, shots, seed=1)
        assert (got.train, got.val, got.test) == (splits.train, splits.val, splits.test)


def test_empty_val_samples_only_train(global_random: None) -> None:
    splits = generated_splits(SIZES, val_size=0)
    got = fewshot_splits(splits, 4, seed=7)
    assert got.val == []
    assert got.train == dassl_reference(splits.train, [], 4, 7)[0]


def test_cache_round_trip(tmp_path: Path) -> None:
    splits = generated_splits(SIZES)
    first = fewshot_splits(splits, 4, seed=2, cache_dir=tmp_path)
    cache = tmp_path / "shot_4-seed_2.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shot_4-seed_2.json"]  # no temp file left over
    raw = json.loads(cache.read_text())
    assert (raw["dataset"], raw["num_shots"], raw["seed"]) == ("gen", 4, 2)
    assert raw["train"][0] == [first.train[0].path, first.train[0].label, first.train[0].classname]
    # The cache, not a fresh draw, decides: edit it to another valid subset and load again.
    raw["train"] = raw["train"][::-1]
    cache.write_text(json.dumps(raw))
    again = fewshot_splits(splits, 4, seed=2, cache_dir=tmp_path)
    assert again.train == first.train[::-1] and again.val == first.val


def test_cache_of_another_dataset_is_rejected(tmp_path: Path) -> None:
    fewshot_splits(generated_splits(SIZES), 2, seed=1, cache_dir=tmp_path)
    other = generated_splits({0: 5, 1: 5})
    other.name = "other"
    with pytest.raises(DataError) as err:
        fewshot_splits(other, 2, seed=1, cache_dir=tmp_path)
    message = str(err.value)
    assert str(tmp_path / "shot_2-seed_1.json") in message
    assert "was drawn from other train/val data" in message  # the content decides, not the name
    assert "train[0]: 'c3/" in message and "is not in the dataset's train split" in message
    assert "delete" in message


def test_cache_with_broken_entry_names_it(tmp_path: Path) -> None:
    splits = generated_splits(SIZES)
    (tmp_path / "shot_1-seed_1.json").write_text(
        json.dumps({"dataset": "gen", "num_shots": 1, "seed": 1, "train": [["c0/0.jpg", 0]], "val": []})
    )
    with pytest.raises(DataError, match=r"train\[0\]: expected a 3-item list"):
        fewshot_splits(splits, 1, seed=1, cache_dir=tmp_path)


def test_benchmark_reader_and_its_cache_folder(bench_root, tmp_path: Path) -> None:
    root, _ = bench_root
    splits = load_dataset("eurosat", root)
    got = fewshot_splits(splits, 2, seed=1, cache_dir=tmp_path / "split_fewshot")
    assert len(got.train) == 2 * 3 and len(got.val) == 2 * 3
    assert (tmp_path / "split_fewshot" / "shot_2-seed_1.json").is_file()


OFFICIAL = ["split_zhou_Caltech101.json", "split_zhou_DescribableTextures.json", "split_zhou_EuroSAT.json",
            "split_zhou_OxfordFlowers.json", "split_zhou_OxfordPets.json", "split_zhou_StanfordCars.json",
            "split_zhou_UCF101.json"]  # fmt: skip


@pytest.mark.parametrize("filename", OFFICIAL)
def test_matches_dassl_reference_on_official_splits(filename: str, global_random: None) -> None:
    shared_splits = shared_splits_dir()
    parts, classnames = read_split_file(shared_splits / filename)
    splits = DatasetSplits(filename, Path("."), parts["train"], parts["val"], parts["test"], classnames)
    for num_shots, seed in ((16, 1), (1, 3), (4, 2)):
        got = fewshot_splits(splits, num_shots, seed)
        ref_train, ref_val = dassl_reference(parts["train"], parts["val"], num_shots, seed)
        assert (got.train, got.val) == (ref_train, ref_val), (num_shots, seed)
        assert len(got.train) == num_shots * len(classnames)


def test_cache_survives_renaming_a_custom_folder(tmp_path: Path) -> None:
    from datafixtures import write_image

    from vladapt.data import load_custom

    folder = tmp_path / "pets"
    for cls in ("cat", "dog"):
        for i in range(6):
            write_image(folder / cls / f"{i}.png", shade=i)
    splits = load_custom(folder)
    first = fewshot_splits(splits, 2, seed=3, cache_dir=splits.fewshot_cache_dir)
    cache = folder / "split_fewshot" / "shot_2-seed_3.json"
    raw = json.loads(cache.read_text())
    raw["train"] = raw["train"][::-1]  # the cache, not a fresh draw, must decide after the move
    cache.write_text(json.dumps(raw))
    moved = tmp_path / "elsewhere" / "my-pets"
    moved.parent.mkdir()
    folder.rename(moved)
    splits = load_custom(moved)
    assert splits.name == "my-pets"
    again = fewshot_splits(splits, 2, seed=3, cache_dir=splits.fewshot_cache_dir)
    assert again.train == first.train[::-1] and again.val == first.val
    assert str(folder) not in (moved / "split_fewshot" / "shot_2-seed_3.json").read_text()


def test_cache_of_changed_data_is_rejected(tmp_path: Path) -> None:
    splits = generated_splits(SIZES)
    fewshot_splits(splits, 2, seed=1, cache_dir=tmp_path)
    # One more training image: the cached draw is no longer the draw of this data.
    grown = generated_splits(SIZES)
    grown.train.append(Datum("c0/extra.jpg", 0, grown.classnames[0]))
    with pytest.raises(DataError) as err:
        fewshot_splits(grown, 2, seed=1, cache_dir=tmp_path)
    message = str(err.value)
    assert str(tmp_path / "shot_2-seed_1.json") in message
    assert "was drawn from other train/val data" in message and "delete" in message


def test_cache_without_data_key_from_a_renamed_dataset_is_used(tmp_path: Path) -> None:
    splits = generated_splits(SIZES)
    first = fewshot_splits(splits, 2, seed=4, cache_dir=tmp_path)
    cache = tmp_path / "shot_2-seed_4.json"
    raw = json.loads(cache.read_text())
    del raw["data"]  # as written by vladapt before the key existed
    raw["dataset"] = "old-folder-name"
    cache.write_text(json.dumps(raw))
    again = fewshot_splits(splits, 2, seed=4, cache_dir=tmp_path)
    assert (again.train, again.val) == (first.train, first.val)


def test_an_unwritable_cache_folder_warns_and_draws_the_same_subset(tmp_path: Path) -> None:
    splits = generated_splits({0: 5, 1: 6, 2: 4})
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")  # a cache folder below a file cannot be created (also as root)
    with pytest.warns(UserWarning, match=r"few-shot split cache .*a_file/cache/shot_2-seed_3\.json cannot be written"):
        few = fewshot_splits(splits, 2, seed=3, cache_dir=blocker / "cache")
    assert few.train == fewshot_splits(splits, 2, seed=3).train and few.val == fewshot_splits(splits, 2, seed=3).val
