"""``pxpo base distill-lcm``: latent consistency distillation of the embedded default into a 2-8 step model."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..core.lcm import boundary_scalings, guidance_embedding
from ..plots import save_grid
from ..prompts import digit_prompt
from ..storage import atomic_dir
from .digits import digits_dataset, evaluate_lcm_digits
from .pretrain import _cosine


@dataclass
class LCMSpec:
    """Budget of the consistency distillation of the embedded default."""

    steps: int = 1000  # distillation steps
    batch_size: int = 32
    lr: float = 5e-4
    ink: str = "colours"  # the distillation images' ink (the teacher's: BaseModelSpec.ink)
    guidance_min: float = 1.5  # teacher CFG scale range sampled per example (w = scale - 1 is embedded)
    guidance_max: float = 4.0
    skip: int = 20  # DDIM solver skip: 1000 / original_inference_steps (50)
    ema_decay: float = 0.95  # target network EMA, as in the LCM paper
    w_dim: int = 32  # w-embedding size (UNet time_cond_proj_dim)
    seed: int = 0


def distill_lcm(teacher_pipe, spec: LCMSpec, progress: bool = True):
    """Latent consistency distillation (Luo et al. 2023, arXiv 2310.04378) of ``teacher_pipe``.

    The student is the teacher's UNet plus a w-embedding input (guidance
    distilled in), trained so that its consistency function f(x_{t+k}) matches
    the EMA target's f(x_t), where x_t is one teacher DDIM step (with CFG)
    from x_{t+k}. Returns (student pipeline with an LCMScheduler, figures).
    """
    import copy

    from diffusers import DDPMScheduler, LatentConsistencyModelPipeline, LCMScheduler, UNet2DConditionModel
    from tqdm.auto import tqdm


    g = torch.Generator().manual_seed(spec.seed)
    torch.manual_seed(spec.seed)
    vae, te, tok, teacher = teacher_pipe.vae, teacher_pipe.text_encoder, teacher_pipe.tokenizer, teacher_pipe.unet
    teacher.eval().requires_grad_(False)
    student = UNet2DConditionModel.from_config(teacher.config, time_cond_proj_dim=spec.w_dim)
    student.load_state_dict(teacher.state_dict(), strict=False)
    with torch.no_grad():  # w-embedding starts as a no-op
        student.time_embedding.cond_proj.weight.zero_()
    target = copy.deepcopy(student).eval().requires_grad_(False)
    student.train()

    images, labels = digits_dataset(vae.config.sample_size, spec.ink, 1, spec.seed)
    with torch.no_grad():
        dists = [vae.encode(images[i : i + 256]).latent_dist for i in range(0, len(images), 256)]
    mean, std = torch.cat([d.mean for d in dists]), torch.cat([d.std for d in dists])
    sf = vae.config.scaling_factor
    with torch.no_grad():
        ids = tok([digit_prompt(d) for d in range(10)] + [""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
        emb = te(ids)[0]
    sched = DDPMScheduler.from_config(teacher_pipe.scheduler.config)
    ac = sched.alphas_cumprod
    n_solver = sched.config.num_train_timesteps // spec.skip
    solver_ts = torch.arange(1, n_solver + 1) * spec.skip - 1  # 19, 39, ..., 999

    opt = torch.optim.AdamW(student.parameters(), lr=spec.lr, weight_decay=0.0)
    t0 = time.perf_counter()
    bar = tqdm(range(spec.steps), desc="distill lcm", disable=not progress)
    for step in bar:
        for grp in opt.param_groups:
            grp["lr"] = spec.lr * _cosine(step, spec.steps)
        idx = torch.randint(0, len(images), (spec.batch_size,), generator=g)
        x0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * sf
        cond = emb[labels[idx]]
        uncond = emb[10:].expand_as(cond)
        k = torch.randint(0, n_solver, (spec.batch_size,), generator=g)
        t_start = solver_ts[k]
        t_end = (t_start - spec.skip).clamp(min=0)
        noise = torch.randn(x0.shape, generator=g)
        x_start = sched.add_noise(x0, noise, t_start)
        w = spec.guidance_min + (spec.guidance_max - spec.guidance_min) * torch.rand(spec.batch_size, generator=g)
        w_emb = guidance_embedding(w - 1.0, spec.w_dim)

        def shape(v):
            return v.view(-1, 1, 1, 1)

        a_s, a_e = shape(ac[t_start]), shape(ac[t_end])
        cs_s, co_s = (shape(v) for v in boundary_scalings(t_start))
        cs_e, co_e = (shape(v) for v in boundary_scalings(t_end))

        eps = student(x_start, t_start, timestep_cond=w_emb, encoder_hidden_states=cond).sample
        pred_x0 = (x_start - (1 - a_s).sqrt() * eps) / a_s.sqrt()
        model_pred = cs_s * x_start + co_s * pred_x0
        with torch.no_grad():
            out = teacher(torch.cat([x_start, x_start]), torch.cat([t_start, t_start]), encoder_hidden_states=torch.cat([uncond, cond])).sample
            e_u, e_c = out.chunk(2)
            e_t = e_u + shape(w) * (e_c - e_u)
            x0_t = (x_start - (1 - a_s).sqrt() * e_t) / a_s.sqrt()
            x_end = a_e.sqrt() * x0_t + (1 - a_e).sqrt() * e_t  # one deterministic DDIM step of the teacher
            eps_tg = target(x_end, t_end, timestep_cond=w_emb, encoder_hidden_states=cond).sample
            x0_tg = (x_end - (1 - a_e).sqrt() * eps_tg) / a_e.sqrt()
            target_pred = cs_e * x_end + co_e * x0_tg
        loss = F.mse_loss(model_pred.float(), target_pred.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for pt, ps in zip(target.parameters(), student.parameters()):
                pt.mul_(spec.ema_decay).add_(ps.detach(), alpha=1 - spec.ema_decay)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    stats = {"lcm_final_loss": float(loss.item()), "lcm_seconds": time.perf_counter() - t0}
    lcm_sched = LCMScheduler.from_config(teacher_pipe.scheduler.config, original_inference_steps=n_solver)
    pipe = LatentConsistencyModelPipeline(
        vae=vae, text_encoder=te, tokenizer=tok, unet=target, scheduler=lcm_sched, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe, stats



def build_lcm(teacher_dir: Path, out_dir: Path, spec: LCMSpec, progress: bool = True) -> dict:
    """Distil the teacher at ``teacher_dir`` into a consistency model saved (atomically) at ``out_dir``."""
    from diffusers import StableDiffusionPipeline


    t0 = time.perf_counter()
    teacher = StableDiffusionPipeline.from_pretrained(str(teacher_dir), safety_checker=None, requires_safety_checker=False)
    pipe, stats = distill_lcm(teacher, spec, progress=progress)
    grids = {}
    for steps in (2, 4, 8):
        images, acc = evaluate_lcm_digits(pipe, steps=steps, seed=spec.seed)
        stats[f"prompt_following_accuracy_{steps}_steps"] = acc
        grids[steps] = images
    stats["total_seconds"] = time.perf_counter() - t0
    stats["spec"] = asdict(spec)
    stats["teacher"] = str(teacher_dir)
    stats["torch_threads"] = torch.get_num_threads()
    with atomic_dir(Path(out_dir)) as tmp:
        pipe.save_pretrained(tmp)
        save_grid(grids[4], tmp / "samples.png", nrow=8)
        (tmp / "build.json").write_text(json.dumps(stats, indent=2))
    return stats
