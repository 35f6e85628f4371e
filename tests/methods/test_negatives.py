"""Training-step class subsets (negative sampling)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vladapt.methods.negatives import sample_step_classes


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_positives_come_first_sorted_and_labels_are_remapped():
    labels = torch.tensor([7, 3, 7, 12, 3, 0])
    class_ids, remapped = sample_step_classes(labels, num_classes=40, ratio=5, batch_size=16, generator=seeded())
    assert class_ids[:4].tolist() == [0, 3, 7, 12]
    assert remapped.tolist() == [2, 1, 2, 3, 1, 0]
    assert torch.equal(class_ids[remapped], labels)
    negatives = class_ids[4:]
    assert len(negatives) == 5 * 4
    assert len(set(negatives.tolist())) == 20 and not set(negatives.tolist()) & {0, 3, 7, 12}
    assert class_ids.dtype == remapped.dtype == torch.long


def test_negatives_are_capped_by_the_absent_classes():
    labels = torch.arange(15).repeat(2)[:16]
    class_ids, remapped = sample_step_classes(labels, num_classes=20, ratio=5, batch_size=16, generator=seeded())
    assert sorted(class_ids.tolist()) == list(range(20))
    assert torch.equal(class_ids[remapped], labels)


def test_exactly_one_negative_class():
    # C = |P| + 1: the released code squeezes the single index to 0-d and crashes (§1.13 defect 5).
    labels = torch.tensor([0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16])
    class_ids, remapped = sample_step_classes(labels, num_classes=17, ratio=5, batch_size=16, generator=seeded())
    assert class_ids.tolist() == [0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 4]
    assert torch.equal(class_ids[remapped], labels)


def test_no_negatives_left():
    labels = torch.arange(17)
    class_ids, remapped = sample_step_classes(labels, num_classes=17, ratio=5, batch_size=16, generator=seeded())
    assert class_ids.tolist() == list(range(17)) and torch.equal(remapped, labels)


def test_ratio_zero_uses_only_the_batch_classes():
    labels = torch.tensor([9, 4, 4, 30])
    class_ids, remapped = sample_step_classes(labels, num_classes=50, ratio=0, batch_size=16, generator=seeded())
    assert class_ids.tolist() == [4, 9, 30] and remapped.tolist() == [1, 0, 0, 2]


@pytest.mark.parametrize("ratio,num_classes,batch_size", [(-1, 50, 16), (5, 16, 16), (5, 5, 16), (0, 10, 16)])
def test_inactive_uses_all_classes_and_keeps_labels(ratio, num_classes, batch_size):
    labels = torch.tensor([3, 1, 4, 1])
    g = seeded()
    state = g.get_state()
    class_ids, remapped = sample_step_classes(labels, num_classes, ratio, batch_size, generator=g)
    assert class_ids.tolist() == list(range(num_classes))
    assert remapped is labels
    assert torch.equal(g.get_state(), state)


def test_seeded_generator_is_deterministic_and_negatives_vary():
    labels = torch.tensor([2, 5, 5, 11])
    a = sample_step_classes(labels, 100, 5, 16, generator=seeded(3))
    b = sample_step_classes(labels, 100, 5, 16, generator=seeded(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    g = seeded(4)
    drawn = {tuple(sample_step_classes(labels, 100, 5, 16, generator=g)[0].tolist()) for _ in range(20)}
    assert len(drawn) == 20


def test_negatives_are_uniform_over_absent_classes():
    labels = torch.tensor([0, 1])
    g = seeded(6)
    counts = torch.zeros(30)
    for _ in range(2000):
        class_ids, _ = sample_step_classes(labels, 30, 1, 16, generator=g)
        counts[class_ids[2:]] += 1
    assert counts[:2].sum() == 0
    # 4000 draws over 28 classes: about 143 each.
    assert counts[2:].min() > 100 and counts[2:].max() < 190


def test_labels_out_of_range():
    with pytest.raises(ValueError, match="0..9"):
        sample_step_classes(torch.tensor([0, 10]), 10, 5, 4)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_invariants(data):
    num_classes = data.draw(st.integers(1, 40))
    batch_size = data.draw(st.integers(1, 32))
    ratio = data.draw(st.integers(-1, 8))
    labels = torch.tensor(data.draw(st.lists(st.integers(0, num_classes - 1), min_size=1, max_size=32)))
    class_ids, remapped = sample_step_classes(labels, num_classes, ratio, batch_size, generator=seeded())
    ids = class_ids.tolist()
    assert len(set(ids)) == len(ids) and all(0 <= c < num_classes for c in ids)
    assert torch.equal(class_ids[remapped], labels)
    if ratio < 0 or num_classes <= batch_size:
        assert ids == list(range(num_classes))
    else:
        present = sorted(set(labels.tolist()))
        assert ids[: len(present)] == present
        assert len(ids) == len(present) + min(num_classes - len(present), ratio * len(present))
