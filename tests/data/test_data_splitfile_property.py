"""Property: the split-file loader turns ANY JSON into valid splits or a DataError, nothing else."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from vladapt.data.base import SPLIT_NAMES, unsafe_path_reason
from vladapt.data.splitfile import read_split_file
from vladapt.errors import DataError

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-3, max_value=5)
    | st.integers(min_value=2**31, max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["", ".", "..", "../x.jpg", "/etc/hostname", "a/../../b", "C:/x", "a.jpg", "cls/b.png"])
)
any_json = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=6) | st.sampled_from(SPLIT_NAMES), inner, max_size=5),
    max_leaves=30,
)
# Entries that are often well formed, so the checks after parsing (classes, gaps, paths) get exercised.
entry = st.one_of(
    st.tuples(scalars, scalars, scalars).map(list),
    st.tuples(
        st.sampled_from(["a.jpg", "b/c.png", "../up.jpg", "/abs.jpg", "x/./y.jpg", "d\\..\\..\\e.jpg"]),
        st.integers(min_value=-1, max_value=4) | st.sampled_from([2**40, 10**18]),
        st.sampled_from(["cat", "dog", "", "bird"]),
    ).map(list),
    any_json,
)
split_like = st.fixed_dictionaries(
    {}, optional={name: st.lists(entry, max_size=6) | any_json for name in SPLIT_NAMES}
).flatmap(lambda d: st.dictionaries(st.text(max_size=4), any_json, max_size=2).map(lambda extra: {**extra, **d}))
documents = split_like | any_json


@pytest.fixture(scope="module")
def split_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("prop") / "split.json"


def _check_valid(parts: dict, classnames: list[str]) -> None:
    assert set(parts) == set(SPLIT_NAMES)
    assert all(isinstance(name, str) and name for name in classnames)
    for items in parts.values():
        for datum in items:
            assert isinstance(datum.path, str) and unsafe_path_reason(datum.path) is None
            assert 0 <= datum.label < len(classnames) and classnames[datum.label] == datum.classname


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=documents)
@example(document={"train": [["a.jpg", 10**18, "cat"]], "val": [], "test": []})
@example(document={"train": [["a.jpg", 0, "cat"]], "val": [], "test": [["b.jpg", 0, "cat"]]})
def test_any_json_gives_valid_splits_or_a_data_error(split_path: Path, document: object) -> None:
    split_path.write_text(json.dumps(document), encoding="utf-8", errors="surrogatepass")
    try:
        parts, classnames = read_split_file(split_path)
    except DataError as err:
        assert str(split_path) in str(err)
        return
    _check_valid(parts, classnames)


@settings(max_examples=50, deadline=None)
@given(text=st.text(max_size=40) | st.binary(max_size=40).map(lambda b: b.decode("latin-1")))
@example(text="[" * 100_000)  # json.loads raises RecursionError
@example(text='{"train": [["a.jpg", ' + "1" * 5000 + ', "cat"]]}')  # int() digit limit: a plain ValueError
def test_any_text_gives_valid_splits_or_a_data_error(split_path: Path, text: str) -> None:
    split_path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        parts, classnames = read_split_file(split_path)
    except DataError:
        return
    _check_valid(parts, classnames)
