"""Text classifiers built from class names and prompt templates, with a cache that knows when it is stale."""

from __future__ import annotations

from typing import Callable, Hashable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from vladapt.methods.templates import format_prompts


def weights_state(modules: Iterable[nn.Module]) -> tuple:
    """A cheap key that changes whenever any parameter or buffer of ``modules`` is replaced or
    modified in place (every in-place op, e.g. an optimizer step, bumps a tensor's version)."""
    key = []
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            key.append((id(t), t._version, t.data_ptr(), t.dtype, t.device.type))
    return tuple(key)


class ClassifierCache:
    """Holds one computed text classifier and the key it was computed for.

    The key must cover everything the classifier depends on: class names, templates, the
    weights' state (:func:`weights_state`) and any method setting (e.g. an evaluation scale).
    """

    def __init__(self) -> None:
        self._key: Hashable | None = None
        self._value: Tensor | None = None

    def get(self, key: Hashable, compute: Callable[[], Tensor]) -> Tensor:
        if self._value is None or key != self._key:
            self._value = compute()
            self._key = key
        return self._value

    def clear(self) -> None:
        self._key = None
        self._value = None


@torch.no_grad()
def encode_prompts(encode: Callable[[Tensor], Tensor], tokenizer: Callable[[list[str]], Tensor],
                   prompts: list[str], device: torch.device, batch_size: int = 256,
                   progress: bool = False, desc: str = "text") -> Tensor:
    """Encode prompts in batches -> L2-normalized features ``[len(prompts), E]`` (fp32)."""
    out = []
    batches = range(0, len(prompts), batch_size)
    for i in tqdm(batches, desc=desc, disable=not progress or len(batches) < 2, leave=False):
        tokens = tokenizer(prompts[i : i + batch_size]).to(device)
        out.append(F.normalize(encode(tokens).float(), dim=-1))
    return torch.cat(out)


@torch.no_grad()
def build_text_classifier(encode: Callable[[Tensor], Tensor], tokenizer: Callable[[list[str]], Tensor],
                          classnames: list[str], templates: list[str], device: torch.device,
                          batch_size: int = 256, progress: bool = False) -> Tensor:
    """Template-averaged classifier ``[C, E]``: per template encode and L2-normalize every class's
    prompt, average over templates, L2-normalize again (CLIP's ensembling)."""
    acc = None
    for t in tqdm(templates, desc="templates", disable=not progress or len(templates) < 2, leave=False):
        feats = encode_prompts(encode, tokenizer, format_prompts(t, classnames), device, batch_size)
        acc = feats if acc is None else acc + feats
    return F.normalize(acc / len(templates), dim=-1)
