"""Shared fixtures: the tiny backbone and inputs for it."""

from __future__ import annotations

import pytest
import torch
from hypothesis import settings

torch.set_num_threads(2)

# Property tests draw the same examples on every run (the suite, and CI, give one answer per commit);
# `pytest --hypothesis-profile=explore` draws new random ones on each run, to look for more.
settings.register_profile("fixed", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False, database=None)
settings.load_profile("fixed")


@pytest.fixture(scope="session", autouse=True)
def _feature_cache_in_a_temporary_folder(tmp_path_factory):
    """CLI runs in the tests keep frozen features in a temporary folder, never in the user's cache."""
    import os

    from vladapt.engine.feature_cache import ENV_VAR

    saved = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = str(tmp_path_factory.mktemp("feature-cache"))
    yield
    if saved is None:
        os.environ.pop(ENV_VAR, None)
    else:
        os.environ[ENV_VAR] = saved


@pytest.fixture(scope="session")
def tiny():
    from vladapt.backbones import load_clip

    return load_clip("vladapt-test-tiny")


@pytest.fixture(scope="session")
def vit_b16():
    """The ViT-B/16 architecture with random weights, loaded once (parameter counts, structure).
    Tests must leave it as they found it: frozen, nothing attached, weights unchanged."""
    from vladapt.backbones import load_clip

    return load_clip("ViT-B-16-quickgelu")


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 3, 32, 32, generator=g)


@pytest.fixture
def tokens(tiny):
    return tiny.tokenizer(["a photo of a cat.", "a red star on a striped background", "dog"])
