"""What the engine hands each training step: batches, augmentations and the step's generator.

``fit``'s determinism contract (engine/train.py): all randomness of an epoch comes from (seed, epoch),
so steps of different epochs draw differently, the same (seed, epoch, step) repeats exactly, and a
different seed gives different draws. Checked by recording what ``method.training_step`` receives,
without reusing the engine's seed formula.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from vladapt.config import from_mapping
from vladapt.data import DatasetSplits, Datum
from vladapt.engine.train import TrainConfig, epoch_batches, fit
from vladapt.methods import create_method

NUM_ITEMS = 6  # one image per class, so a label names the item


@pytest.fixture(scope="module")
def one_per_class(tmp_path_factory) -> DatasetSplits:
    root = tmp_path_factory.mktemp("one_per_class")
    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(NUM_ITEMS):
        arr = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(root / f"{i}.png")
        items.append(Datum(f"{i}.png", i, f"thing {i}"))
    return DatasetSplits("one_per_class", Path(root), items, [], [], [f"thing {i}" for i in range(NUM_ITEMS)])


def _record(tiny, splits: DatasetSplits, seed: int, epochs: int = 3) -> dict[tuple[int, int], dict]:
    """Run ``fit`` and return, per (epoch, step), the global labels, the images and 8 numbers drawn
    from a copy of the step's generator (the method's own draws are left untouched)."""
    torch.manual_seed(1234 + seed)  # the method's initial weights; must not matter for what is recorded
    method = create_method("heba", tiny, splits.classnames)
    real_step = method.training_step
    seen: dict[tuple[int, int], dict] = {}

    def recording_step(images, labels, step):
        copy = torch.Generator()
        copy.set_state(step.generator.get_state())
        seen[(step.epoch, step.step)] = {"labels": step.global_labels.tolist(), "images": images.clone(),
                                         "draw": torch.rand(8, generator=copy)}
        return real_step(images, labels, step)

    method.training_step = recording_step
    cfg = from_mapping(TrainConfig, {"epochs": epochs, "batch_size": 2, "lr": 0.01, "precision": "fp32"})
    fit(method, splits, cfg, seed, progress=False)
    return seen


def test_step_generators_batches_and_augmentations_follow_seed_and_epoch(tiny, one_per_class):
    a = _record(tiny, one_per_class, seed=7)
    steps = NUM_ITEMS // 2
    assert sorted(a) == [(e, s) for e in range(3) for s in range(steps)]

    # every epoch visits each item once
    for e in range(3):
        labels = [lab for s in range(steps) for lab in a[(e, s)]["labels"]]
        assert sorted(labels) == list(range(NUM_ITEMS))

    # the step generator differs between epochs at the same step, and between every pair of steps
    draws = {k: tuple(v["draw"].tolist()) for k, v in a.items()}
    for s in range(steps):
        assert len({draws[(e, s)] for e in range(3)}) == 3, f"step {s} draws the same in different epochs"
    assert len(set(draws.values())) == len(draws), "two steps draw the same numbers"

    # the batch order changes between epochs
    orders = {tuple(lab for s in range(steps) for lab in a[(e, s)]["labels"]) for e in range(3)}
    assert len(orders) > 1

    # the same item is augmented differently in different epochs (random crops by default)
    def view(run, epoch, item):
        for s in range(steps):
            if item in run[(epoch, s)]["labels"]:
                return run[(epoch, s)]["images"][run[(epoch, s)]["labels"].index(item)]
        raise AssertionError(f"item {item} not seen in epoch {epoch}")

    for item in range(NUM_ITEMS):
        assert not torch.equal(view(a, 0, item), view(a, 1, item))

    # the same seed repeats everything exactly, whatever the global RNG state
    again = _record(tiny, one_per_class, seed=7)
    assert again.keys() == a.keys()
    for k in a:
        assert again[k]["labels"] == a[k]["labels"]
        assert torch.equal(again[k]["draw"], a[k]["draw"])
        assert torch.equal(again[k]["images"], a[k]["images"])

    # another seed draws differently at every (epoch, step)
    other = _record(tiny, one_per_class, seed=8, epochs=2)
    for k in other:
        assert not torch.equal(other[k]["draw"], a[k]["draw"])


def test_epoch_batches_partition_drop_the_last_batch_and_depend_on_seed_and_epoch():
    b = epoch_batches(10, 4, seed=3, epoch=0)
    assert [len(x) for x in b] == [4, 4]  # the incomplete last batch is dropped
    flat = [i for x in b for i in x]
    assert len(set(flat)) == 8 and set(flat) <= set(range(10))
    assert epoch_batches(10, 4, seed=3, epoch=0) == b
    assert epoch_batches(10, 4, seed=3, epoch=1) != b
    assert epoch_batches(10, 4, seed=4, epoch=0) != b
    assert sorted(epoch_batches(3, 8, seed=0, epoch=0)[0]) == [0, 1, 2]  # fewer items than a batch: one batch


@pytest.mark.parametrize("momentum,nesterov,decay", [(0.9, False, 5e-4), (0.9, True, 5e-4), (0.0, False, 0.0)])
def test_the_engines_sgd_is_the_fused_kernel_and_equals_the_multi_tensor_loop_bit_for_bit(momentum, nesterov, decay):
    from vladapt.engine.train import TrainConfig, build_optimizer

    g = torch.Generator().manual_seed(0)
    shapes = [(300, 64), (64,), (7, 3, 3)]
    start = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(3)]
    cfg = TrainConfig(lr=0.01, momentum=momentum, nesterov=nesterov, weight_decay=decay)

    def run(make):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        opt = make([{"params": params[:2]}, {"params": params[2:], "lr_scale": 0.1, "weight_decay": 0.0}])
        for gs in grads:
            for p, gr in zip(params, gs):
                p.grad = gr.clone()
            opt.step()
        return opt, params

    fused_opt, fused = run(lambda groups: build_optimizer(cfg, groups))
    assert all(group["fused"] for group in fused_opt.param_groups)
    _, loop = run(lambda groups: torch.optim.SGD(groups, lr=cfg.lr, momentum=momentum, weight_decay=decay,
                                                 nesterov=nesterov, foreach=True))
    for a, b in zip(fused, loop):
        assert torch.equal(a, b)
