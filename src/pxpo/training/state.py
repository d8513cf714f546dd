"""The optimisation state of a run: pipeline + trainable UNet, optimiser, Accelerate;
saving the policy and checkpoints.

:func:`build_train_state` is what a stage calls to get the loop's pipeline
and :class:`TrainState` from a config; the loop itself (:mod:`pxpo.training.loop`)
receives them.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Config


@dataclass
class TrainState:
    """Everything the optimisation needs besides the data.

    ``policy``: the :class:`pxpo.core.policy.Policy` the run samples and trains
    with (built once from ``cfg.sample`` and the scheduler). ``train_compute`` /
    ``sample_compute``: the run's :class:`pxpo.training.compute_batch.ComputeBatch`es
    (``auto`` measures once per run). ``compiled``: with ``train.compile``, the
    torch.compile'd networks the denoisers call (``unet`` itself stays as is). ``reference``: the
    KL penalty's reference (``train.kl_coef`` > 0, else None), built with the state.
    """

    accelerator: object
    unet: torch.nn.Module
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    scheduler: object
    policy: object = None
    train_compute: object = None
    sample_compute: object = None
    compiled: dict | None = None  # train.compile: {"train": torch.compile(unet), "sample": torch.compile(unwrapped unet)}
    reference: object = None  # train.kl_coef > 0: the KL reference (pxpo.training.reference.Reference), the base model


def build_train_state(cfg: Config, accelerator=None):
    """Load the pipeline, attach LoRA (or unfreeze the UNet), build the optimizer.

    Returns (pipe, TrainState). Under torchrun every process builds the same
    state (same LoRA init); DDP averages the gradients. Mixed precision: "auto" is fp16 on CUDA and
    none on CPU; frozen VAE / text encoder (and LoRA's base UNet) in that dtype.
    """
    from accelerate import Accelerator

    from .distributed import check_accelerator, check_divisible
    from .compute_batch import ComputeBatch
    from .reference import Reference
    from ..core.policies import make_policy
    from ..models import add_lora, compile_network, load_configured_pipeline, resolve_dtype

    t = cfg.train
    if accelerator is None:
        mp = t.mixed_precision
        if mp == "auto":
            mp = "fp16" if torch.cuda.is_available() else "no"
        # cpu=True on a machine without CUDA: under torchrun (WORLD_SIZE > 1) Accelerate then forms a gloo
        # group instead of starting N independent runs; on GPUs torchrun's LOCAL_RANK selects NCCL.
        # No gradient accumulation here: pxpo.training.step scales and syncs each optimizer step's chunks itself.
        accelerator = Accelerator(mixed_precision=mp, cpu=not torch.cuda.is_available())
    if accelerator.device.type == "cuda":  # TF32 matmuls and convolutions (Ampere and later): fp32 LoRA weights and VAE
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    check_accelerator(accelerator)
    check_divisible(cfg.sample.batch_size, t.batch_size, accelerator.num_processes)
    mp = accelerator.mixed_precision
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mp, torch.float32)
    if cfg.model.dtype != "auto":
        weight_dtype = resolve_dtype(cfg.model.dtype, accelerator.device)
    pipe = load_configured_pipeline(cfg, device=accelerator.device, dtype=weight_dtype)
    policy = make_policy(cfg.sample, pipe.scheduler)
    _ = policy.trained_steps  # a policy with nothing to train refuses here (one-step LCM)
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
    compiled = None
    if t.compile:  # the modules stay as they are (saving, unwrapping, no_sync); the denoisers call these
        compiled = {"train": compile_network(unet), "sample": compile_network(accelerator.unwrap_model(unet))}
    dev = accelerator.device
    return pipe, TrainState(
        accelerator,
        unet,
        optimizer,
        params,
        pipe.scheduler,
        policy=policy,
        train_compute=ComputeBatch(t.compute_batch, dev, "train.compute_batch"),
        sample_compute=ComputeBatch(cfg.sample.compute_batch, dev, "sample.compute_batch"),
        compiled=compiled,
        # taken now, before any checkpoint or stage state is loaded: the reference is the base model
        reference=Reference.build(accelerator, unet, t),
    )


def save_policy(state: TrainState, cfg: Config, out_dir: Path) -> None:
    """Save the trained policy: LoRA (diffusers format) or the full UNet."""
    from ..models import save_lora

    unet = state.accelerator.unwrap_model(state.unet)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.train.use_lora:
        save_lora(unet, out_dir)
    else:
        unet.save_pretrained(out_dir / "unet")


def save_checkpoint(state: TrainState, run_dir: Path, epoch: int, keep: int) -> None:
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
