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

@pytest.fixture(scope="session")
def tiny_vae_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny pipeline with its VAE trained 60 steps on digits (~6 s): decoded images then depend on the
    latents, so an image reward can be learnt (the random VAE decodes nearly the same grey for any latent)."""
    import torch.nn.functional as F

    from pxpo.embedded.digits import digits_dataset
    from pxpo.models import load_pipeline

    pipe = load_pipeline(str(tiny_model_dir))
    images, _ = digits_dataset(16)
    g = torch.Generator().manual_seed(0)
    vae = pipe.vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    for _ in range(60):
        x = images[torch.randint(0, images.shape[0], (32,), generator=g)]
        post = vae.encode(x).latent_dist
        loss = F.mse_loss(vae.decode(post.sample(generator=g)).sample, x) + 1e-3 * post.kl().mean() / x[0].numel()
        opt.zero_grad()
        loss.backward()
        opt.step()
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        vae.register_to_config(scaling_factor=float(1 / vae.encode(images[:512]).latent_dist.mean.std()))
    d = tmp_path_factory.mktemp("models") / "tiny-vae"
    pipe.save_pretrained(d)
    return d


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    """A random tiny SD3 pipeline (flow matching, joint-attention transformer) saved with save_pretrained."""
    from pxpo.embedded.sd3 import make_tiny_sd3_pipeline

    pipe = make_tiny_sd3_pipeline(seed=0)
    with torch.no_grad():  # a non-trivial velocity (random init has a near-zero output layer)
        torch.manual_seed(0)
        for p in pipe.transformer.proj_out.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    d = tmp_path_factory.mktemp("models") / "tiny-sd3"
    pipe.save_pretrained(d)
    return d
