"""The embedded flow default: a tiny Stable-Diffusion-3-architecture pipeline built and pretrained offline.

``pxpo base build --arch sd3`` creates a stock :class:`diffusers.StableDiffusion3Pipeline`
from scratch, with no download:

* two small :class:`transformers.CLIPTextModelWithProjection` text encoders with the
  project's locally trained tokenizer (SD3's CLIP-L and CLIP-G slots); the optional
  T5 encoder is left out (``text_encoder_3=None``: the pipeline fills its block of the
  prompt embedding with zeros, as diffusers documents for SD3 without T5),
* a small :class:`diffusers.AutoencoderKL` with VAE factor 2 (16 x 16 x 3 images
  <-> 8 x 8 x 4 latents) and SD3's latent convention z = (latent - shift) * scale,
* an :class:`diffusers.SD3Transformer2DModel` (MMDiT joint attention),
* a :class:`diffusers.FlowMatchEulerDiscreteScheduler`,

then pretrains the VAE, and the transformer with both text encoders on the
rectified-flow objective (x_t = (1 - t) x_0 + t eps, target v = eps - x_0, t from
SD3's logit-normal density), on the digits data of the SD default, in a few CPU
minutes (:func:`collapsed_t5_block`: the 256 zero tokens of the missing T5 count as
one, exactly, which makes a step 5x cheaper); checks prompt following with the digit classifier, and saves with
``save_pretrained``. Load it with ``StableDiffusion3Pipeline.from_pretrained(dir,
text_encoder_3=None, tokenizer_3=None)`` (diffusers needs the two Nones spelled out).

:func:`make_tiny_sd3_pipeline` builds the same architecture with random weights in
well under a second: tests use it.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..plots import save_grid
from ..prompts import digit_prompt
from ..storage import atomic_dir
from .digits import digits_dataset, stock_pipeline_digits
from .pretrain import _cosine, ema_step
from .tokenizer import build_tokenizer


@dataclass
class SD3Spec:
    """Architecture and pretraining budget of the embedded flow default."""

    image_size: int = 16  # pixels per side
    vae_channels: tuple[int, ...] = (32, 64)  # VAE block widths; factor = 2 ** (len - 1)
    latent_channels: int = 4
    patch_size: int = 1  # transformer patch (1: one token per latent position, 64 tokens)
    layers: int = 4  # MMDiT blocks
    heads: int = 4
    head_dim: int = 16  # hidden width = heads * head_dim
    text_dim: int = 32  # width of EACH CLIP encoder; joint_attention_dim = pooled dim = 2 * text_dim
    text_layers: int = 2
    max_length: int = 16  # CLIP tokenizer length
    shift: float = 1.0  # the scheduler's time shift (SD3 uses 3.0 at 1024 px; small latents need none)
    vae_steps: int = 600
    flow_steps: int = 3000  # transformer + text encoder steps
    batch_size: int = 32
    vae_lr: float = 2e-3
    flow_lr: float = 1e-3
    uncond_prob: float = 0.1  # empty prompts, for classifier-free guidance
    ema_decay: float = 0.995
    eval_per_digit: int = 8  # the prompt-following check: samples per digit
    eval_steps: int = 20  # and Euler steps (guidance 3.0)
    seed: int = 0


def build_sd3_components(spec: SD3Spec | None = None, seed: int = 0) -> dict:
    """Randomly initialised components: the kwargs of :class:`diffusers.StableDiffusion3Pipeline`."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    spec = spec or SD3Spec()
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(spec.max_length)

    def text_encoder():
        return CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=len(tokenizer), hidden_size=spec.text_dim, intermediate_size=spec.text_dim * 2,
                num_hidden_layers=spec.text_layers, num_attention_heads=4, max_position_embeddings=spec.max_length,
                projection_dim=spec.text_dim, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )

    n_vae = len(spec.vae_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n_vae, up_block_types=("UpDecoderBlock2D",) * n_vae,
        block_out_channels=spec.vae_channels, latent_channels=spec.latent_channels, layers_per_block=1, norm_num_groups=16,
        sample_size=spec.image_size, shift_factor=0.0, scaling_factor=1.0,
    )
    latent = spec.image_size // 2 ** (n_vae - 1)
    transformer = SD3Transformer2DModel(
        sample_size=latent, patch_size=spec.patch_size, in_channels=spec.latent_channels, out_channels=spec.latent_channels,
        num_layers=spec.layers, attention_head_dim=spec.head_dim, num_attention_heads=spec.heads,
        joint_attention_dim=2 * spec.text_dim, caption_projection_dim=spec.heads * spec.head_dim,
        pooled_projection_dim=2 * spec.text_dim, pos_embed_max_size=latent // spec.patch_size,
    )
    return dict(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=spec.shift), vae=vae,
        text_encoder=text_encoder(), tokenizer=tokenizer, text_encoder_2=text_encoder(), tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None,
    )


def make_tiny_sd3_pipeline(seed: int = 0, spec: SD3Spec | None = None):
    """A randomly initialised tiny StableDiffusion3Pipeline (for tests)."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(**build_sd3_components(spec, seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextlib.contextmanager
def collapsed_t5_block(n_keys: int, n_zero: int = 256):
    """Inside the block, joint attention over ``n_keys`` keys gives the last key ``log(n_zero)`` more logit.

    Without T5, SD3's pipeline appends ``max_sequence_length`` (256) zero tokens to the
    prompt embedding. They enter the transformer identical (context_embedder(0) is its
    bias) and stay identical through every block (per-token maps, and one query's
    attention output), so attending to 256 of them equals attending to ONE with its
    logit raised by log 256 (softmax counts copies). Pretraining encodes prompts with
    ``max_sequence_length=1`` inside this block: the same function of the weights as
    the stock pipeline computes (pinned by a test), at a fifth of the cost. The
    joint sequence is [image tokens, CLIP tokens, the zero token], so the zero token
    is the last key; ``n_keys`` = image tokens + CLIP tokens + 1 picks the joint
    attention calls (diffusers' JointAttnProcessor2_0 calls
    ``torch.nn.functional.scaled_dot_product_attention`` without a mask).
    """
    sdpa = F.scaled_dot_product_attention
    bias = torch.zeros(1, n_keys)
    bias[0, -1] = math.log(n_zero)

    def biased(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        if attn_mask is None and not is_causal and k.shape[-2] == n_keys:
            attn_mask = bias.to(device=q.device, dtype=q.dtype)
        return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kw)

    F.scaled_dot_product_attention = biased
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa


def _train_vae(vae, images: torch.Tensor, spec: SD3Spec, g: torch.Generator, progress: bool) -> float:
    """Reconstruction + small KL (as the SD default's VAE); returns the final loss."""
    from tqdm.auto import tqdm

    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=spec.vae_lr, weight_decay=0.0)
    loss = torch.tensor(float("nan"))
    for step in tqdm(range(spec.vae_steps), desc="pretrain vae", disable=not progress):
        for grp in opt.param_groups:
            grp["lr"] = spec.vae_lr * _cosine(step, spec.vae_steps)
        x = images[torch.randint(0, len(images), (spec.batch_size,), generator=g)]
        post = vae.encode(x).latent_dist
        loss = F.mse_loss(vae.decode(post.sample(generator=g)).sample, x) + 1e-3 * post.kl().mean() / x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    vae.eval().requires_grad_(False)
    return float(loss.item())


def pretrain_sd3(pipe, spec: SD3Spec, progress: bool = True) -> dict:
    """Pretrain the VAE, then the transformer and both text encoders (flow matching), in place; returns figures."""
    g = torch.Generator().manual_seed(spec.seed)
    images, labels = digits_dataset(spec.image_size)
    stats: dict = {}
    t0 = time.perf_counter()
    stats["vae_final_loss"] = _train_vae(pipe.vae, images, spec, g, progress)
    stats["vae_seconds"] = time.perf_counter() - t0
    with torch.no_grad():
        dists = [pipe.vae.encode(images[i : i + 256]).latent_dist for i in range(0, len(images), 256)]
        mean, std = torch.cat([d.mean for d in dists]), torch.cat([d.std for d in dists])
    shift, scale = float(mean.mean()), float(1.0 / mean.std())
    pipe.vae.register_to_config(shift_factor=shift, scaling_factor=scale)  # SD3: z = (latent - shift) * scale
    stats.update(vae_shift_factor=shift, vae_scaling_factor=scale)

    t0 = time.perf_counter()
    tr = pipe.transformer
    n_keys = (tr.config.sample_size // tr.config.patch_size) ** 2 + pipe.tokenizer.model_max_length + 1
    with collapsed_t5_block(n_keys):  # exact: the stock pipeline's 256 zero tokens as one
        stats["flow_final_loss"] = _train_flow(pipe, (mean - shift) * scale, std * scale, labels, spec, g, progress)
    stats["flow_seconds"] = time.perf_counter() - t0
    return stats


def _train_flow(pipe, mean: torch.Tensor, std: torch.Tensor, labels: torch.Tensor, spec: SD3Spec, g, progress: bool) -> float:
    """Transformer + both text encoders on rectified flow; x_0 ~ N(mean, std^2) per image (scaled latents). Final loss."""
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    tr, te1, te2 = pipe.transformer.train(), pipe.text_encoder.train(), pipe.text_encoder_2.train()
    params = [p for m in (tr, te1, te2) for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=spec.flow_lr, weight_decay=1e-4)
    ema = EMAModel(params, decay=spec.ema_decay, use_ema_warmup=True, power=0.75)
    prompts = [digit_prompt(d) for d in range(10)] + [""]
    loss = torch.tensor(float("nan"))
    bar = tqdm(range(spec.flow_steps), desc="pretrain transformer", disable=not progress)
    for step in bar:
        for grp in opt.param_groups:
            grp["lr"] = spec.flow_lr * _cosine(step, spec.flow_steps)
        idx = torch.randint(0, len(mean), (spec.batch_size,), generator=g)
        x0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)
        drop = torch.rand(spec.batch_size, generator=g) < spec.uncond_prob
        batch_prompts = [prompts[10 if d else int(c)] for d, c in zip(drop, labels[idx])]
        embeds, _, pooled, _ = pipe.encode_prompt(batch_prompts, None, None, device="cpu", do_classifier_free_guidance=False, max_sequence_length=1)
        t = torch.sigmoid(torch.randn(spec.batch_size, generator=g)).view(-1, 1, 1, 1)  # logit-normal (SD3, arXiv 2403.03206)
        noise = torch.randn(x0.shape, generator=g)
        v = tr(hidden_states=(1 - t) * x0 + t * noise, timestep=t.flatten() * 1000, encoder_hidden_states=embeds, pooled_projections=pooled).sample
        loss = F.mse_loss(v, noise - x0)
        ema_step(loss, opt, params, ema)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    ema.copy_to(params)
    for m in (tr, te1, te2):
        m.eval().requires_grad_(False)
    return float(loss.item())


def evaluate_sd3_digits(pipe, per_digit: int = 8, steps: int = 20, guidance: float = 3.0, seed: int = 0):
    """Sample ``per_digit`` images of each digit with the stock SD3 pipeline (Euler ODE).

    Returns (images (10*per_digit, 3, H, W) in [0, 1], prompt-following accuracy of the digit classifier).
    """
    return stock_pipeline_digits(pipe, pipe.transformer.config.sample_size, per_digit, steps, guidance, seed)


def build_sd3_base(out_dir: Path, spec: SD3Spec, progress: bool = True) -> dict:
    """Build, pretrain and save the flow default at ``out_dir`` (atomically): pipeline, samples.png, build.json."""
    torch.manual_seed(spec.seed)
    t0 = time.perf_counter()
    pipe = make_tiny_sd3_pipeline(spec.seed, spec)
    stats = pretrain_sd3(pipe, spec, progress=progress)
    images, acc = evaluate_sd3_digits(pipe, per_digit=spec.eval_per_digit, steps=spec.eval_steps, seed=spec.seed)
    stats["prompt_following_accuracy"] = acc
    stats["eval"] = {"samples": len(images), "euler_steps": spec.eval_steps, "guidance": 3.0}
    stats["total_seconds"] = time.perf_counter() - t0
    stats["params"] = {k: sum(p.numel() for p in getattr(pipe, k).parameters()) for k in ("transformer", "vae", "text_encoder", "text_encoder_2")}
    stats["spec"] = asdict(spec)
    stats["torch_threads"] = torch.get_num_threads()
    with atomic_dir(Path(out_dir)) as tmp:
        pipe.save_pretrained(tmp)
        save_grid(images, tmp / "samples.png", nrow=spec.eval_per_digit)
        (tmp / "build.json").write_text(json.dumps(stats, indent=2))
    return stats
