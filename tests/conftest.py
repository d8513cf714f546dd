"""Shared fixtures: randomly initialised tiny pipelines (no pretraining in tests)."""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_pipe():
    from pxpo.base_model import make_tiny_pipeline

    pipe = make_tiny_pipeline(seed=0)
    # Random init gives near-zero UNet outputs; a seeded perturbation makes
    # predictions non-trivial so log-prob tests exercise real values.
    return pipe


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_pipe):
    """The tiny pipeline saved with save_pretrained (loaded back via from_pretrained)."""
    d = tmp_path_factory.mktemp("models") / "tiny"
    tiny_pipe.save_pretrained(d)
    return d


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
