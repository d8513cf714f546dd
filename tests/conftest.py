"""Shared fixtures: randomly initialised tiny pipelines (no pretraining in tests)."""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_pipe():
    from pxpo.embedded.architecture import make_tiny_pipeline

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



@pytest.fixture(scope="session")
def tiny_lcm_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny pipeline with a w-embedding UNet and an LCMScheduler (a random 'consistency model')."""
    import shutil

    from diffusers import LCMScheduler, UNet2DConditionModel

    d = tmp_path_factory.mktemp("models") / "tiny-lcm"
    shutil.copytree(tiny_model_dir, d)
    base = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet")
    unet = UNet2DConditionModel.from_config(base.config, time_cond_proj_dim=16)
    unet.load_state_dict(base.state_dict(), strict=False)
    unet.save_pretrained(d / "unet")
    LCMScheduler.from_pretrained(tiny_model_dir / "scheduler").save_pretrained(d / "scheduler")
    return d

def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
