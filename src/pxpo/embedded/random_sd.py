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

``--arch sd35m`` saves a stock :class:`diffusers.StableDiffusion3Pipeline` with
Stable Diffusion 3.5 Medium's configs: the MMDiT-X transformer (24 blocks of 24 x 64,
the first 13 with dual attention, RMS qk-norm; 2.24 B parameters), the 16-channel
VAE, CLIP-L and OpenCLIP-bigG text encoders with projection, and the flow scheduler
(shift 3.0), 1024 px by default (pass 512 px to the sampler for the GPU benchmark).
The T5-XXL encoder (4.7 B parameters) is left out (``text_encoder_3=None``, the
pipeline then fills its block of the prompt embedding with zeros): it encodes each
prompt once per epoch and does not enter the time of sampling or training.
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

# Stable Diffusion 3.5 Medium's component configs (its model_index components' config.json values).
SD35M_TRANSFORMER = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)),
    qk_norm="rms_norm",
)
SD35M_VAE = dict(
    sample_size=1024,
    in_channels=3,
    out_channels=3,
    latent_channels=16,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    norm_num_groups=32,
    scaling_factor=1.5305,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
CLIP_L = dict(SD15_TEXT)  # CLIP ViT-L/14 text tower, with its 768 x 768 projection
CLIP_G = dict(  # OpenCLIP ViT-bigG/14 text tower, with its 1280 x 1280 projection
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    max_position_embeddings=77, projection_dim=1280, hidden_act="gelu",
)
SD35M_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
SD3_ARCHS = {"sd35m": (SD35M_TRANSFORMER, SD35M_VAE, (CLIP_L, CLIP_G), SD35M_SCHEDULER)}


def _sd3_components(arch: str) -> dict:
    """StableDiffusion3Pipeline kwargs with ``arch``'s shapes, T5 left out (module docstring)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tr_cfg, vae_cfg, (l_cfg, g_cfg), sched_cfg = SD3_ARCHS[arch]
    tokenizer = build_tokenizer(l_cfg["max_position_embeddings"])
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return dict(
        transformer=SD3Transformer2DModel(**tr_cfg),
        vae=AutoencoderKL(**vae_cfg),
        text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**l_cfg, **ids)),
        tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**g_cfg, **ids)),
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
        scheduler=FlowMatchEulerDiscreteScheduler(**sched_cfg),
    )


def random_components(arch: str = "sd15", seed: int = 0) -> dict:
    """Randomly initialised components with ``arch``'s shapes (kwargs of its pipeline class, :func:`pipeline_class`).

    Call it under ``with torch.device("meta"):`` to get the modules without
    allocating their weights (parameter counts, memory estimates).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if arch not in ARCHS and arch not in SD3_ARCHS:
        from ..errors import PxpoInputError

        raise PxpoInputError(f"--arch {arch}", "unknown architecture", f"use one of {sorted(ARCHS) + sorted(SD3_ARCHS)}")
    torch.manual_seed(seed)
    if arch in SD3_ARCHS:
        return _sd3_components(arch)
    unet_cfg, vae_cfg, text_cfg, sched_cfg = ARCHS[arch]
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


def pipeline_class(arch: str):
    """StableDiffusion3Pipeline for the SD3 architectures, StableDiffusionPipeline otherwise."""
    import diffusers

    return diffusers.StableDiffusion3Pipeline if arch in SD3_ARCHS else diffusers.StableDiffusionPipeline


def save_random_pipeline(out: Path, arch: str = "sd15", *, dtype: str = "float16", seed: int = 0) -> dict:
    """Build the random pipeline and save it at ``out`` (atomically); returns the parameter counts."""
    pipe = pipeline_class(arch)(**random_components(arch, seed))
    pipe.to(dtype={"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype])
    names = ("transformer", "vae", "text_encoder", "text_encoder_2") if arch in SD3_ARCHS else ("unet", "vae", "text_encoder")
    counts = {name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in names}
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
