"""Architecture of the embedded default: component configs and a random-weight pipeline (tests use it; only ``pxpo base build`` pretrains)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .tokenizer import build_tokenizer

# Stable Diffusion's noise schedule and DDIM settings (the embedded default and the SD-shaped fixtures).
SD_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)


@dataclass
class BaseModelSpec:
    """Architecture and pretraining budget of the embedded default.

    Every field has a default that gives recognisable digits in a few CPU minutes.
    """

    image_size: int = 16  # pixels per side of the generated images
    vae_channels: tuple[int, ...] = (32, 64)  # VAE block widths; factor = 2 ** (len - 1)
    latent_channels: int = 4
    unet_channels: tuple[int, ...] = (32, 64)  # UNet block widths (cross-attention at each level)
    text_dim: int = 32  # width of the text encoder and the UNet's cross-attention
    text_layers: int = 2
    max_length: int = 16  # tokenizer.model_max_length (tokens incl. start/end)
    vae_steps: int = 600  # VAE pretraining steps
    unet_steps: int = 3000  # UNet + text encoder pretraining steps (1,500 gave seed-dependent prompt following: 0.12-0.89)
    batch_size: int = 32
    vae_lr: float = 2e-3
    unet_lr: float = 1e-3
    text_lr_mult: float = 1.0  # text encoder learning rate = unet_lr * this
    uncond_prob: float = 0.1  # fraction of empty prompts (for classifier-free guidance)
    ema_decay: float = 0.995
    ink: str = "colours"  # training images: "colours" (each digit in a random ink colour; the prompt names no colour) | "white"
    ink_copies: int = 4  # coloured copies of each of the 1,797 digits
    seed: int = 0


def build_components(spec: BaseModelSpec | None = None, seed: int = 0) -> dict:
    """Randomly initialised components of the tiny pipeline (no training).

    Returns the kwargs of :class:`diffusers.StableDiffusionPipeline`.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    spec = spec or BaseModelSpec()
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(spec.max_length)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=spec.text_dim,
            intermediate_size=spec.text_dim * 2,
            num_hidden_layers=spec.text_layers,
            num_attention_heads=4,
            max_position_embeddings=spec.max_length,
            projection_dim=spec.text_dim,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    n_vae = len(spec.vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n_vae,
        up_block_types=("UpDecoderBlock2D",) * n_vae,
        block_out_channels=spec.vae_channels,
        latent_channels=spec.latent_channels,
        layers_per_block=1,
        norm_num_groups=16,
        sample_size=spec.image_size,
    )
    n_unet = len(spec.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=spec.image_size // 2 ** (n_vae - 1),
        in_channels=spec.latent_channels,
        out_channels=spec.latent_channels,
        block_out_channels=spec.unet_channels,
        down_block_types=("CrossAttnDownBlock2D",) * n_unet,
        up_block_types=("CrossAttnUpBlock2D",) * n_unet,
        layers_per_block=1,
        cross_attention_dim=spec.text_dim,
        attention_head_dim=4,
        norm_num_groups=16,
    )
    scheduler = DDIMScheduler(**SD_SCHEDULER)
    return dict(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def make_tiny_pipeline(seed: int = 0, spec: BaseModelSpec | None = None):
    """A randomly initialised tiny StableDiffusionPipeline (for tests)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**build_components(spec, seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe
