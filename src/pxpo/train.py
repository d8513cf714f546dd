"""The training loop: sample -> label -> advantages -> train, for N epochs.

One epoch, top to bottom (:func:`run`):

1. SAMPLING: draw prompts, roll out the current policy with stochastic DDIM
   and classifier-free guidance, keep every latent and per-element log-prob
   (:func:`sample_trajectories`).
2. LABELLING: decode x_0, score with the reward labeller -> maps (N, H, W)
   (:func:`label_images`).
3. ADVANTAGES: map to the latent grid and normalise per prompt
   (:func:`compute_advantages`); DDPO uses each map's mean as its scalar.
4. TRAINING: shuffle samples, permute timesteps per sample, re-score the
   stored actions under the current weights, PXPO or DDPO loss, accumulate
   over timesteps (and micro-batches), clip the grad norm, step
   (:func:`train_on_trajectories`).

The stages ``pxpo sample`` / ``label`` / ``train`` call the same functions on
artifacts on disk; ``pxpo run`` calls them in one process.

Launch on several GPUs with Accelerate::

    accelerate launch --num_processes 8 -m pxpo.cli run --params params.yaml model.path=runwayml/stable-diffusion-v1-5

Every process samples ``sample.batch_size * sample.num_batches`` images with its
own seeds; rewards are gathered for the per-prompt statistics; gradients are
averaged by DDP.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import Config
from .core.advantages import PerPromptStatTracker, to_latent_grid
from .core.losses import ddpo_loss, pxpo_loss
from .core.rewards import make_labeller
from .core.lcm import lcm_model_output, lcm_step_with_logprob, prev_timesteps, sample_lcm
from .core.sampling import decode_latents, encode_prompts, sample_ddim, step_log_prob
from .prompts import draw_prompts, load_weighted_prompts
from .tracking import NullTracker, Tracker
from .trajectories import Trajectories, check_reward_maps, make_meta, quantize_images


def sample_seed(seed: int, epoch: int, process: int, index: int) -> int:
    """The noise seed of one sample: a function of (run seed, epoch, process, index) only,
    so a resumed run draws exactly the samples an uninterrupted one would."""
    return ((seed * 1_000_003 + epoch) * 1_009 + process) * 100_003 + index


@torch.no_grad()
def sample_trajectories(pipe, cfg: Config, prompts: list[str], seeds: list[int], *, progress=False) -> Trajectories:
    """Roll out the policy for ``prompts`` (one sample each, noise from ``seeds``).

    Returns:
        :class:`Trajectories` with latents (N, T+1, C, h, w), log_probs
        (N, T, C, h, w), images (N, 3, H, W) quantised to 8 bits.
    """
    s = cfg.sample
    unet, device = pipe.unet, pipe.unet.device
    was_training = unet.training
    unet.eval()
    neg = encode_prompts(pipe.tokenizer, pipe.text_encoder, [cfg.prompts.negative_prompt])
    c = unet.config.in_channels
    size = unet.config.sample_size
    latent_shape = (c, size, size) if isinstance(size, int) else (c, *size)
    parts = []
    for i in range(0, len(prompts), s.batch_size):
        batch_prompts = prompts[i : i + s.batch_size]
        cond = encode_prompts(pipe.tokenizer, pipe.text_encoder, batch_prompts)
        gens = [torch.Generator().manual_seed(sd) for sd in seeds[i : i + s.batch_size]]
        if s.sampler == "lcm":
            roll, final = sample_lcm(
                unet, pipe.scheduler, cond, neg, latent_shape=latent_shape, num_steps=s.num_steps, guidance_scale=s.guidance_scale, generator=gens
            )
        else:
            roll = sample_ddim(
                unet,
                pipe.scheduler,
                cond,
                neg,
                latent_shape=latent_shape,
                num_steps=s.num_steps,
                eta=s.eta,
                guidance_scale=s.guidance_scale,
                generator=gens,
                progress=progress,
            )
            final = roll.latents[:, -1]
        # RLCM: the reward is on the last f_theta output (`final`), not the last noised sample.
        images = quantize_images(decode_latents(pipe.vae, final.to(device)))
        parts.append((roll, cond.float().cpu(), images.cpu()))
    unet.train(was_training)
    meta = make_meta(
        model_path=cfg.model.path,
        revision=cfg.model.revision,
        scheduler_config=pipe.scheduler.config,
        num_steps=s.num_steps,
        eta=s.eta,
        guidance_scale=s.guidance_scale,
        negative_prompt=cfg.prompts.negative_prompt,
        sampler=s.sampler,
    )
    return Trajectories(
        latents=torch.cat([p[0].latents.cpu() for p in parts]),
        log_probs=torch.cat([p[0].log_probs.cpu() for p in parts]),
        timesteps=parts[0][0].timesteps,
        prompt_embeds=torch.cat([p[1] for p in parts]),
        negative_prompt_embeds=neg.float().cpu(),
        prompts=list(prompts),
        seeds=list(seeds),
        images=torch.cat([p[2] for p in parts]),
        meta=meta,
    )


def label_images(labeller, images: torch.Tensor, prompts: list[str], where: str = "reward labeller") -> tuple[torch.Tensor, dict]:
    """Score images (N, 3, H, W) -> maps (N, H, W), checked for shape and finiteness."""
    maps, info = labeller(images, prompts)
    check_reward_maps(maps, images.shape[0], tuple(images.shape[-2:]), where)
    return maps.float(), info


def compute_advantages(
    tracker: PerPromptStatTracker, prompts: list[str], maps: torch.Tensor, latent_hw: tuple[int, int], algorithm: str
) -> torch.Tensor:
    """Advantages from reward maps (N, H, W).

    PXPO: maps area-averaged to the latent grid, per-position stat tracking ->
    (N, h, w). DDPO: each map's mean as the scalar reward -> (N,).
    """
    if algorithm == "ddpo":
        return tracker.update(prompts, maps.float().mean((1, 2)))
    return tracker.update(prompts, to_latent_grid(maps, latent_hw))


@dataclass
class TrainState:
    """Everything the optimisation needs besides the data."""

    accelerator: object
    unet: torch.nn.Module
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    scheduler: object


def train_on_trajectories(state: TrainState, traj: Trajectories, advantages: torch.Tensor, cfg: Config, epoch: int, *, progress=False) -> dict:
    """Inner epochs of policy-gradient updates on stored trajectories.

    Args:
        traj: this process's samples (N of them).
        advantages: (N, h, w) PXPO maps or (N,) DDPO scalars.

    Returns:
        mean diagnostics: loss, approx_kl, clipfrac, ratio, grad_norm, optimizer_steps.
    """
    from tqdm.auto import tqdm

    acc, unet, t = state.accelerator, state.unet, cfg.train
    s = cfg.sample
    device = acc.device
    n, steps = traj.latents.shape[0], traj.timesteps.shape[0]
    n_train_t = max(1, int(steps * t.timestep_fraction))
    g = torch.Generator().manual_seed(cfg.seed * 7_919 + epoch * 104_729 + acc.process_index)
    neg = traj.negative_prompt_embeds.to(device)
    prev_t = prev_timesteps(traj.timesteps)  # LCM re-noising targets
    logs = {"loss": [], "approx_kl": [], "clipfrac": [], "ratio": [], "grad_norm": []}
    unet.train()
    total = t.inner_epochs * math.ceil(n / t.batch_size) * n_train_t
    bar = tqdm(total=total, desc=f"train epoch {epoch}", disable=not progress, leave=False)
    for _ in range(t.inner_epochs):
        perm = torch.randperm(n, generator=g)
        time_perm = torch.stack([torch.randperm(steps, generator=g) for _ in range(n)])
        for start in range(0, n, t.batch_size):
            idx = perm[start : start + t.batch_size]
            cond = traj.prompt_embeds[idx].to(device)
            adv = advantages[idx].to(device)
            for j in range(n_train_t):
                tj = time_perm[idx, j]
                x_t = traj.latents[idx, tj].to(device)
                x_prev = traj.latents[idx, tj + 1].to(device)
                lp_old = traj.log_probs[idx, tj].to(device)
                timestep = traj.timesteps[tj].to(device)
                with acc.accumulate(unet):
                    with acc.autocast():
                        if s.sampler == "lcm":
                            pred = lcm_model_output(unet, x_t, timestep, cond, neg, s.guidance_scale)
                            out = lcm_step_with_logprob(state.scheduler, pred, timestep, prev_t[tj].to(device), x_t, prev_sample=x_prev)
                        else:
                            out = step_log_prob(
                                unet,
                                state.scheduler,
                                x_t,
                                timestep,
                                x_prev,
                                cond,
                                neg,
                                num_steps=s.num_steps,
                                eta=s.eta,
                                guidance_scale=s.guidance_scale,
                            )
                    if t.algorithm == "ddpo":
                        res = ddpo_loss(out.log_prob, lp_old, adv, mode=t.loss, clip_range=t.clip_range, adv_clip_max=t.adv_clip_max)
                    else:
                        res = pxpo_loss(
                            out.log_prob, lp_old, adv, mode=t.loss, ratio=t.ratio, clip_range=t.clip_range, adv_clip_max=t.adv_clip_max
                        )
                    acc.backward(res.loss)
                    if acc.sync_gradients:
                        gn = acc.clip_grad_norm_(state.params, t.max_grad_norm)
                        logs["grad_norm"].append(float(gn))
                    state.optimizer.step()
                    state.optimizer.zero_grad(set_to_none=True)
                logs["loss"].append(res.loss.item())
                logs["approx_kl"].append(res.approx_kl.item())
                logs["clipfrac"].append(res.clipfrac.item())
                logs["ratio"].append(res.ratio_mean.item())
                bar.update(1)
    bar.close()
    out = {k: (sum(v) / len(v) if v else float("nan")) for k, v in logs.items()}
    out["optimizer_steps"] = len(logs["grad_norm"])
    return out


def build_train_state(cfg: Config, accelerator=None):
    """Load the pipeline, attach LoRA (or unfreeze the UNet), build the optimizer.

    Returns (pipe, TrainState). Mixed precision: "auto" is fp16 on CUDA and
    none on CPU; frozen VAE / text encoder (and LoRA's base UNet) in that dtype.
    """
    from accelerate import Accelerator

    from .models import add_lora, load_configured_pipeline, resolve_dtype

    t = cfg.train
    if accelerator is None:
        mp = t.mixed_precision
        if mp == "auto":
            mp = "fp16" if torch.cuda.is_available() else "no"
        n_train_t = max(1, int(cfg.sample.num_steps * t.timestep_fraction))
        accelerator = Accelerator(mixed_precision=mp, gradient_accumulation_steps=t.gradient_accumulation_steps * n_train_t)
    mp = accelerator.mixed_precision
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mp, torch.float32)
    if cfg.model.dtype != "auto":
        weight_dtype = resolve_dtype(cfg.model.dtype, accelerator.device)
    pipe = load_configured_pipeline(cfg, device=accelerator.device, dtype=weight_dtype)
    unet = pipe.unet
    torch.manual_seed(cfg.seed)  # LoRA's A matrices are drawn at random: same seed, same start
    if t.use_lora:
        params = add_lora(unet, t.lora_rank, t.lora_alpha)
    else:
        unet.float().requires_grad_(True)
        params = list(unet.parameters())
    optimizer = torch.optim.AdamW(
        params,
        lr=t.learning_rate,
        betas=(t.adam_beta1, t.adam_beta2),
        weight_decay=t.weight_decay,
        eps=t.adam_epsilon,
    )
    unet, optimizer = accelerator.prepare(unet, optimizer)
    return pipe, TrainState(accelerator, unet, optimizer, params, pipe.scheduler)


def save_policy(state: TrainState, cfg: Config, out_dir: Path) -> None:
    """Save the trained policy: LoRA (diffusers format) or the full UNet."""
    from .models import save_lora

    unet = state.accelerator.unwrap_model(state.unet)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.train.use_lora:
        save_lora(unet, out_dir)
    else:
        unet.save_pretrained(out_dir / "unet")


def _gather_prompts(acc, prompts: list[str], all_prompts: list[str]) -> list[str]:
    """Prompts of every process, in process order (gathered as indices into the prompt list)."""
    if acc.num_processes == 1:
        return prompts
    ids = torch.tensor([all_prompts.index(p) for p in prompts], device=acc.device)
    return [all_prompts[i] for i in acc.gather(ids).cpu().tolist()]


def _checkpoint(state: TrainState, run_dir: Path, epoch: int, keep: int) -> None:
    """accelerator.save_state into a temp dir, renamed to checkpoints/epoch_XXXX when complete."""
    acc = state.accelerator
    ckdir = run_dir / "checkpoints"
    final = ckdir / f"epoch_{epoch:04d}"
    tmp = ckdir / f".tmp_epoch_{epoch:04d}"
    if acc.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    acc.wait_for_everyone()
    if acc.is_main_process:
        (tmp / "pxpo_epoch.json").write_text(json.dumps({"completed_epochs": epoch + 1}))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in sorted(ckdir.glob("epoch_*"))[:-keep]:
            shutil.rmtree(old)
    acc.wait_for_everyone()


def latest_checkpoint(run_dir: Path) -> Path | None:
    cks = sorted((Path(run_dir) / "checkpoints").glob("epoch_*"))
    return cks[-1] if cks else None


def run(
    cfg: Config,
    tracker: Tracker | None = None,
    *,
    progress: bool = True,
    resume: bool = True,
    stop_after_epochs: int | None = None,
    first_batch: tuple[Trajectories, torch.Tensor] | None = None,
    init_state: Path | None = None,
    rounds: int | None = None,
) -> dict:
    """The online loop: ``cfg.train.epochs`` epochs of sample -> label -> train.

    Writes into ``cfg.output_dir``: metrics.jsonl (via the tracker, if it is a
    JsonlTracker), checkpoints/, lora/ (or model/), summary.json,
    reward_curve.png, samples_last_epoch.png. With ``resume`` it continues
    from the newest checkpoint. ``stop_after_epochs`` ends the process early
    (tests simulate a kill with it).

    Stage form (``pxpo train``): ``first_batch`` = (trajectories, reward maps)
    sampled and labelled by the sample/label stages replaces the first epoch's
    sampling and labelling; ``init_state`` is a previous stage output to
    continue from (its ``state/`` and ``pxpo_round.json``); ``rounds`` epochs
    are run, and the final state is exported to ``<output_dir>/state`` so the
    next round can continue.

    Returns:
        the summary dict (also written to summary.json).
    """
    from .core.rewards import REGISTRY  # noqa: F401  (fail early on import problems)

    tracker = tracker or NullTracker()
    run_dir = Path(cfg.output_dir)
    labeller = make_labeller(cfg.reward.name, **cfg.reward.kwargs)
    all_prompts, prompt_weights = load_weighted_prompts(cfg.prompts.source)
    pipe, state = build_train_state(cfg)
    acc = state.accelerator
    stat_tracker = PerPromptStatTracker(cfg.train.buffer_size, cfg.train.min_count, cfg.train.baseline)
    acc.register_for_checkpointing(stat_tracker)

    start_epoch = 0
    ck = latest_checkpoint(run_dir) if resume else None
    if init_state is not None:
        acc.load_state(str(Path(init_state) / "state"))
        start_epoch = json.loads((Path(init_state) / "pxpo_round.json").read_text())["completed_rounds"]
    elif ck is not None:
        acc.load_state(str(ck))
        start_epoch = json.loads((ck / "pxpo_epoch.json").read_text())["completed_epochs"]
        acc.print(f"resumed from {ck} at epoch {start_epoch}")
    elif acc.is_main_process and run_dir.exists():
        for stale in ("metrics.jsonl", "summary.json"):
            (run_dir / stale).unlink(missing_ok=True)
    if hasattr(tracker, "truncate") and acc.is_main_process:
        tracker.truncate(start_epoch)
    if acc.is_main_process:
        tracker.log_params(cfg.to_dict())

    unet_cfg = acc.unwrap_model(state.unet).config
    size = unet_cfg.sample_size
    latent_hw = (size, size) if isinstance(size, int) else tuple(size)
    per_proc = cfg.sample.batch_size * cfg.sample.num_batches
    total_epochs = cfg.train.epochs if rounds is None else start_epoch + rounds
    end_epoch = total_epochs if stop_after_epochs is None else min(total_epochs, start_epoch + stop_after_epochs)
    for epoch in range(start_epoch, end_epoch):
        if first_batch is not None and epoch == start_epoch:
            # Stage form: this epoch's samples and maps come from the sample / label stages.
            traj, maps = first_batch
            t_sample = t_label = 0.0
        else:
            # ---------------- SAMPLING ----------------
            t0 = time.perf_counter()
            prompts = draw_prompts(all_prompts, per_proc, sample_seed(cfg.seed, epoch, acc.process_index, 0), prompt_weights)
            seeds = [sample_seed(cfg.seed, epoch, acc.process_index, i) for i in range(per_proc)]
            pipe.unet = acc.unwrap_model(state.unet)
            with acc.autocast():
                traj = sample_trajectories(pipe, cfg, prompts, seeds, progress=False)
            t_sample = time.perf_counter() - t0

            # ---------------- LABELLING ----------------
            t0 = time.perf_counter()
            maps, _ = label_images(labeller, traj.images, traj.prompts, where=f"reward labeller {cfg.reward.name!r}")
            t_label = time.perf_counter() - t0

        # ---------------- ADVANTAGES ----------------
        all_maps = acc.gather(maps.to(acc.device)).cpu()
        gathered_prompts = _gather_prompts(acc, traj.prompts, all_prompts)
        adv_all = compute_advantages(stat_tracker, gathered_prompts, all_maps, latent_hw, cfg.train.algorithm)
        adv = adv_all[acc.process_index * per_proc : (acc.process_index + 1) * per_proc]

        # ---------------- TRAINING ----------------
        t0 = time.perf_counter()
        train_logs = train_on_trajectories(state, traj, adv, cfg, epoch, progress=progress)
        t_train = time.perf_counter() - t0

        scalar = all_maps.mean((1, 2))
        metrics = {
            "reward_mean": scalar.mean().item(),
            "reward_std": scalar.std(unbiased=False).item(),
            "samples_seen": (epoch + 1) * per_proc * acc.num_processes,
            **train_logs,
            "time_sample": t_sample,
            "time_label": t_label,
            "time_train": t_train,
        }
        if acc.is_main_process:
            tracker.log_metrics(metrics, step=epoch)
            if progress:
                print(
                    f"epoch {epoch:3d}  reward {metrics['reward_mean']:.4f} +- {metrics['reward_std']:.4f}  "
                    f"kl {metrics['approx_kl']:.2e}  clipfrac {metrics['clipfrac']:.3f}  "
                    f"sample {t_sample:.1f}s  train {t_train:.1f}s",
                    flush=True,
                )
        if rounds is None and ((epoch + 1) % cfg.train.save_every == 0 or epoch + 1 == cfg.train.epochs):
            _checkpoint(state, run_dir, epoch, cfg.train.keep_checkpoints)

    summary = {"completed_epochs": end_epoch, "output_dir": str(run_dir)}
    if acc.is_main_process and end_epoch > start_epoch and traj.images.numel():
        from .base_model import save_grid

        save_grid(traj.images[:32], run_dir / "samples_last_epoch.png", nrow=8)
    if rounds is not None:
        acc.save_state(str(run_dir / "state"))
        if acc.is_main_process:
            (run_dir / "pxpo_round.json").write_text(json.dumps({"completed_rounds": end_epoch}))
    if acc.is_main_process and end_epoch == total_epochs:
        save_policy(state, cfg, run_dir / ("lora" if cfg.train.use_lora else "model"))
        history = tracker.history() if hasattr(tracker, "history") else []
        if history:
            from .plots import reward_curve

            summary.update(
                reward_first=history[0]["reward_mean"],
                reward_last=history[-1]["reward_mean"],
                reward_curve=[h["reward_mean"] for h in history],
            )
            reward_curve({cfg.train.algorithm: history}, run_dir / "reward_curve.png")
        from .storage import write_json

        write_json(run_dir / "summary.json", summary)
    acc.wait_for_everyone()
    return summary
