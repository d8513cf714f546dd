"""The embedded default's data and its prompt-following check: scikit-learn's handwritten digits and a digit classifier."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..labellers import classify_images, digit_classifier  # noqa: F401  (the classifier lives in the library: it is also a gold reward)
from ..prompts import digit_prompt


def digits_dataset(image_size: int = 16, ink: str = "white", copies: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's handwritten digits as RGB images.

    ``ink``: ``"white"`` (white ink, one copy of each digit) or ``"colours"`` (each of ``copies``
    copies of the 1,797 digits inked in its own colour: a uniformly random hue at saturation
    0.6-1, drawn with ``seed``). The prompts do not name the colour, so a model trained on the
    coloured set draws the prompted digit in any colour: the embedded default's ink-colour task
    (reward ``ink_colour``) then asks RL for one colour without touching the digit.

    Returns:
        images: (N, 3, S, S) float32 in [-1, 1] (ink on black), N = 1797 * copies.
        labels: (N,) int64 digit classes.
    """
    from sklearn.datasets import load_digits

    if ink not in ("white", "colours"):
        raise ValueError(f"digits_dataset: ink must be 'white' or 'colours', got {ink!r}")
    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False).clamp(0, 1)
    labels = torch.from_numpy(d.target.astype(np.int64))
    if ink == "white":
        return x.repeat(1, 3, 1, 1) * 2 - 1, labels
    g = torch.Generator().manual_seed(seed)
    n = x.shape[0] * copies
    colours = hsv_colours(torch.rand(n, generator=g), 0.6 + 0.4 * torch.rand(n, generator=g))
    x = x.repeat(copies, 1, 1, 1) * colours[:, :, None, None]
    return x * 2 - 1, labels.repeat(copies)


def hsv_colours(hue: torch.Tensor, saturation: torch.Tensor) -> torch.Tensor:
    """Fully bright colours from hue and saturation in [0, 1]: ``(N,), (N,) -> (N, 3)`` RGB in [0, 1]."""
    k = (torch.tensor([5.0, 3.0, 1.0])[None] + hue[:, None] * 6) % 6
    return 1 - saturation[:, None] * (torch.minimum(k, 4 - k).clamp(0, 1))


def evaluate_digits(pipe, per_digit: int = 8, steps: int = 20, guidance: float = 3.0, seed: int = 0):
    """Sample ``per_digit`` images of each digit with the stock diffusers pipeline.

    Returns (images (10*per_digit, 3, H, W) in [0, 1], prompt-following accuracy
    according to :func:`digit_classifier`).
    """
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    prompts = [digit_prompt(d) for d in range(10) for _ in range(per_digit)]
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    out = pipe(
        prompts,
        height=size,
        width=size,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).images
    pred = classify_images(digit_classifier(), out)
    target = np.repeat(np.arange(10), per_digit)
    return out, float((pred == target).mean())



def stock_pipeline_digits(pipe, sample_size: int, per_digit: int, steps: int, guidance: float, seed: int):
    """Sample ``per_digit`` images of each digit with a stock diffusers pipeline's own ``__call__``.

    ``sample_size``: the network's latent size. Returns (images (10*per_digit, 3, H, W) in [0, 1],
    prompt-following accuracy of the digit classifier).
    """
    prompts = [digit_prompt(d) for d in range(10) for _ in range(per_digit)]
    size = sample_size * pipe.vae_scale_factor
    out = pipe(
        prompts, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
        generator=torch.Generator().manual_seed(seed), output_type="pt",
    ).images
    pred = classify_images(digit_classifier(), out)
    return out, float((pred == np.repeat(np.arange(10), per_digit)).mean())


def evaluate_lcm_digits(pipe, per_digit: int = 8, steps: int = 4, guidance: float = 3.0, seed: int = 0):
    """Like :func:`evaluate_digits`, for a LatentConsistencyModelPipeline (``steps`` consistency steps)."""
    return stock_pipeline_digits(pipe, pipe.unet.config.sample_size, per_digit, steps, guidance, seed)
