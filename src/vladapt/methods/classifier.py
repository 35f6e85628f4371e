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
def encode_tokens(encode: Callable[[Tensor], Tensor], tokens: Tensor, device: torch.device,
                  batch_size: int = 256) -> Tensor:
    """Encode token ids ``[N, L]`` in batches -> L2-normalized features ``[N, E]`` (fp32)."""
    return torch.cat([F.normalize(encode(tokens[i : i + batch_size].to(device)).float(), dim=-1)
                      for i in range(0, len(tokens), batch_size)])


@torch.no_grad()
def template_averaged_classifier(encode: Callable[[Tensor], Tensor], token_sets: Iterable[Tensor],
                                 device: torch.device, batch_size: int = 256, progress: bool = False,
                                 total: int | None = None) -> Tensor:
    """CLIP's ensembling: ``token_sets`` yields one ``[C, L]`` token tensor per template; each is
    encoded and L2-normalized, the features are averaged over templates and L2-normalized again."""
    acc, n = None, 0
    for tokens in tqdm(token_sets, desc="templates", total=total, leave=False,
                       disable=not progress or (total or 0) < 2):
        feats = encode_tokens(encode, tokens, device, batch_size)
        acc = feats if acc is None else acc + feats
        n += 1
    return F.normalize(acc / n, dim=-1)


def build_text_classifier(encode: Callable[[Tensor], Tensor], tokenizer: Callable[[list[str]], Tensor],
                          classnames: list[str], templates: list[str], device: torch.device,
                          batch_size: int = 256, progress: bool = False) -> Tensor:
    """Template-averaged classifier ``[C, E]`` from class names and format-string templates."""
    token_sets = (tokenizer(format_prompts(t, classnames)) for t in templates)
    return template_averaged_classifier(encode, token_sets, device, batch_size, progress, total=len(templates))
