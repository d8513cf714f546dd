"""``pxpo base build``: pretrain the embedded default (VAE, then UNet + text encoder) on digits and save it."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from ..plots import save_grid
from ..prompts import digit_prompt
from ..storage import atomic_dir
from .architecture import BaseModelSpec, make_tiny_pipeline
from .digits import digits_dataset, evaluate_digits


def _cosine(step: int, total: int, warmup: int = 50) -> float:
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))


def ema_step(loss: torch.Tensor, opt, params, ema) -> None:
    """One pretraining step: back-propagate ``loss``, clip the grad norm to 1, step, update the EMA weights."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    ema.step(params)


def pretrain(pipe, spec: BaseModelSpec, progress: bool = True) -> dict:
    """Pretrain the VAE, then the UNet and text encoder jointly, in place.

    Returns figures (losses, seconds per phase) for the build report.
    """
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(spec.seed)
    images, labels = digits_dataset(spec.image_size, spec.ink, spec.ink_copies, spec.seed)
    n = images.shape[0]
    stats: dict = {}

    # --- VAE: reconstruction + small KL ---------------------------------
    vae = pipe.vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=spec.vae_lr, weight_decay=0.0)
    t0 = time.perf_counter()
    bar = tqdm(range(spec.vae_steps), desc="pretrain vae", disable=not progress)
    for step in bar:
        for grp in opt.param_groups:
            grp["lr"] = spec.vae_lr * _cosine(step, spec.vae_steps)
        idx = torch.randint(0, n, (spec.batch_size,), generator=g)
        x = images[idx]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.mse_loss(rec, x) + 1e-3 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval().requires_grad_(False)
    stats["vae_final_loss"] = float(loss.item())
    stats["vae_seconds"] = time.perf_counter() - t0

    with torch.no_grad():
        dists = [vae.encode(images[i : i + 256]).latent_dist for i in range(0, n, 256)]
        mean = torch.cat([d.mean for d in dists])
        std = torch.cat([d.std for d in dists])
    scaling = float(1.0 / mean.std())
    vae.register_to_config(scaling_factor=scaling)
    stats["vae_scaling_factor"] = scaling

    # --- UNet + text encoder: epsilon prediction ------------------------
    unet, te, tok = pipe.unet.train(), pipe.text_encoder.train(), pipe.tokenizer
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(
        [{"params": list(unet.parameters()), "mult": 1.0}, {"params": list(te.parameters()), "mult": spec.text_lr_mult}],
        lr=spec.unet_lr,
        weight_decay=1e-4,
    )
    ema = EMAModel(params, decay=spec.ema_decay, use_ema_warmup=True, power=0.75)
    prompts = [digit_prompt(d) for d in range(10)] + [""]
    ids_all = tok(prompts, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    t0 = time.perf_counter()
    bar = tqdm(range(spec.unet_steps), desc="pretrain unet", disable=not progress)
    for step in bar:
        for grp in opt.param_groups:
            grp["lr"] = spec.unet_lr * grp.get("mult", 1.0) * _cosine(step, spec.unet_steps)
        idx = torch.randint(0, n, (spec.batch_size,), generator=g)
        eps0 = torch.randn(mean[idx].shape, generator=g)
        z = (mean[idx] + std[idx] * eps0) * scaling
        drop = torch.rand(spec.batch_size, generator=g) < spec.uncond_prob
        ids = ids_all[torch.where(drop, torch.full_like(labels[idx], 10), labels[idx])]
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (spec.batch_size,), generator=g)
        zt = noise_sched.add_noise(z, noise, t)
        cond = te(ids).last_hidden_state
        pred = unet(zt, t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, noise)
        ema_step(loss, opt, params, ema)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    ema.copy_to(params)
    unet.eval().requires_grad_(False)
    te.eval().requires_grad_(False)
    stats["unet_final_loss"] = float(loss.item())
    stats["unet_seconds"] = time.perf_counter() - t0
    return stats



def build_base(out_dir: Path, spec: BaseModelSpec, progress: bool = True) -> dict:
    """Build, pretrain and save the embedded default at ``out_dir`` (atomically).

    Writes the diffusers pipeline, ``samples.png`` (a grid of 8 samples of each
    digit, one row per digit) and ``build.json`` (figures). Returns the figures.
    """

    torch.manual_seed(spec.seed)
    t0 = time.perf_counter()
    pipe = make_tiny_pipeline(spec.seed, spec)
    stats = pretrain(pipe, spec, progress=progress)
    images, acc = evaluate_digits(pipe, seed=spec.seed)
    stats["prompt_following_accuracy"] = acc
    stats["total_seconds"] = time.perf_counter() - t0
    stats["params"] = {
        "unet": sum(p.numel() for p in pipe.unet.parameters()),
        "vae": sum(p.numel() for p in pipe.vae.parameters()),
        "text_encoder": sum(p.numel() for p in pipe.text_encoder.parameters()),
    }
    stats["spec"] = asdict(spec)
    stats["torch_threads"] = torch.get_num_threads()
    with atomic_dir(Path(out_dir)) as tmp:
        pipe.save_pretrained(tmp)
        save_grid(images, tmp / "samples.png", nrow=8)
        (tmp / "build.json").write_text(json.dumps(stats, indent=2))
    return stats
