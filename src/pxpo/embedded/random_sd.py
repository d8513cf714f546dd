"""Random-weight pipelines with Stable Diffusion's published component shapes: a timing
and numerics fixture for GPU work, with no download.

``pxpo base random --arch sd15 --out DIR`` saves a stock
:class:`diffusers.StableDiffusionPipeline` whose UNet, VAE and text encoder
have Stable Diffusion 1.5's configs (860 M-parameter UNet, 512 px images,
64 x 64 x 4 latents, a 12-layer 768-wide CLIP text encoder) and the project's
own tokenizer at 77 tokens. The weights are random: the pipeline is for
measuring speed, memory and numerics at real scale (what an SD-sized run costs,
how large per-element log-ratios get on 16,384-element latents), never a model
to fine-tune or to judge images by. ``pxpo_fixture.json`` in the directory says
so.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..storage import atomic_dir
from .architecture import SD_SCHEDULER
from .tokenizer import build_tokenizer

# Stable Diffusion 1.5's component configs (the values its model_index components publish).
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)
SD15_VAE = dict(
    sample_size=512,
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    norm_num_groups=32,
    scaling_factor=0.18215,
)
SD15_TEXT = dict(
    vocab_size=49408,  # CLIP's; the project's tokenizer uses the first few hundred ids
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    projection_dim=768,
    hidden_act="quick_gelu",
)
SD15_SCHEDULER = SD_SCHEDULER
ARCHS = {"sd15": (SD15_UNET, SD15_VAE, SD15_TEXT, SD15_SCHEDULER)}


def random_components(arch: str = "sd15", seed: int = 0) -> dict:
    """Randomly initialised components with ``arch``'s shapes (kwargs of StableDiffusionPipeline).

    Call it under ``with torch.device("meta"):`` to get the modules without
    allocating their weights (parameter counts, memory estimates).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if arch not in ARCHS:
        from ..errors import PxpoInputError

        raise PxpoInputError(f"--arch {arch}", "unknown architecture", f"use one of {sorted(ARCHS)}")
    unet_cfg, vae_cfg, text_cfg, sched_cfg = ARCHS[arch]
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(text_cfg["max_position_embeddings"])
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            **text_cfg, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
        )
    )
    return dict(
        vae=AutoencoderKL(**vae_cfg),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=UNet2DConditionModel(**unet_cfg),
        scheduler=DDIMScheduler(**sched_cfg),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_random_pipeline(out: Path, arch: str = "sd15", *, dtype: str = "float16", seed: int = 0) -> dict:
    """Build the random pipeline and save it at ``out`` (atomically); returns the parameter counts."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**random_components(arch, seed))
    pipe.to(dtype={"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype])
    counts = {name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in ("unet", "vae", "text_encoder")}
    info = {
        "fixture": f"random-weight {arch} pipeline (pxpo base random)",
        "purpose": "timing and numerics at real scale; random weights: never fine-tune it or judge images by it",
        "arch": arch,
        "dtype": dtype,
        "seed": seed,
        "parameters": counts,
    }
    with atomic_dir(Path(out)) as tmp:
        pipe.save_pretrained(tmp)
        (tmp / "pxpo_fixture.json").write_text(json.dumps(info, indent=2) + "\n")
    return info
