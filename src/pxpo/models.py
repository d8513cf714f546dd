"""Loading diffusers pipelines and attaching / saving LoRA adapters.

One loading path for every model: ``StableDiffusionPipeline.from_pretrained``
on a local directory (the embedded default, a user's SD 1.x/2.x checkout) or
a hub id. The scheduler is swapped for DDIM with the same config (the policy
in ALGORITHMS.md section 1).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import PxpoInputError

LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """``auto`` is float32 on CPU and float16 on CUDA."""
    if name == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def _looks_local(path: str) -> bool:
    p = Path(path)
    return p.exists() or path.startswith((".", "/", "~")) or path.count("/") != 1


def load_pipeline(path: str, *, revision=None, variant=None, dtype=torch.float32, device="cpu", sampler: str = "ddim"):
    """Load a Stable-Diffusion-style pipeline for RL fine-tuning.

    Args:
        path: diffusers pipeline directory or hub id (``org/name``).
        dtype: dtype of the frozen VAE and text encoder (and the UNet's base
            weights when LoRA is used).

        sampler: ``"ddim"`` (DDIMScheduler) or ``"lcm"`` (LCMScheduler, for
            latent consistency models; an LCM pipeline directory loads the same way).

    Returns:
        a :class:`diffusers.StableDiffusionPipeline` on ``device`` with the
        sampler's scheduler (same config), the VAE and text encoder frozen.

    Raises:
        PxpoInputError: the directory is missing or is not a loadable pipeline.
    """
    from diffusers import DDIMScheduler, LCMScheduler, StableDiffusionPipeline

    fix = "run `pxpo base build` for the embedded default, or set model.path to a diffusers pipeline directory or hub id"
    if _looks_local(path):
        p = Path(path).expanduser()
        if not p.exists():
            raise PxpoInputError(f"model.path={path}", "directory not found", fix)
        if not (p / "model_index.json").is_file():
            raise PxpoInputError(f"model.path={path}", "no model_index.json: not a diffusers pipeline directory", fix)
        path = str(p)
    import os
    import warnings

    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").lower() in ("1", "true", "yes", "on"):
        from diffusers.utils import logging as diffusers_logging  # diffusers does not read that variable itself

        diffusers_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipe = StableDiffusionPipeline.from_pretrained(
                path,
                revision=revision,
                variant=variant,
                torch_dtype=dtype,  # `dtype` in diffusers >= 0.36; torch_dtype works in both
                safety_checker=None,
                requires_safety_checker=False,
            )
    except Exception as e:  # diffusers raises OSError/ValueError/EnvironmentError/safetensors errors
        raise PxpoInputError(
            f"model.path={path}", f"could not be loaded as a diffusers pipeline ({type(e).__name__}: {e})".strip(), fix
        ) from None
    sched_cls = LCMScheduler if sampler == "lcm" else DDIMScheduler
    pipe.scheduler = sched_cls.from_config(pipe.scheduler.config)
    pipe.vae.requires_grad_(False).eval()
    pipe.text_encoder.requires_grad_(False).eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def add_lora(unet, rank: int, alpha: float) -> list[torch.nn.Parameter]:
    """Add a LoRA adapter (peft) to the UNet attention projections; freeze the rest.

    The adapter starts as the identity (B = 0). Trainable LoRA weights are kept
    in float32 even when the base weights are half precision.

    Returns:
        the trainable parameters.
    """
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
    )
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


def save_lora(unet, out_dir: Path) -> None:
    """Save the UNet's LoRA in the diffusers format ``pipe.load_lora_weights(dir)`` reads."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(str(out_dir), unet_lora_layers=state, safe_serialization=True)


def load_lora_into(unet, lora_dir: Path) -> None:
    """Load LoRA weights saved by :func:`save_lora` into a UNet that has an adapter."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import set_peft_model_state_dict

    f = Path(lora_dir) / "pytorch_lora_weights.safetensors"
    if not f.is_file():
        raise PxpoInputError(str(lora_dir), "no pytorch_lora_weights.safetensors", "pass the LoRA directory a train stage wrote")
    state, _ = StableDiffusionPipeline.lora_state_dict(str(lora_dir))
    state = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
    from diffusers.utils import convert_unet_state_dict_to_peft

    result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(state), adapter_name="default")
    if getattr(result, "unexpected_keys", None):
        raise PxpoInputError(str(lora_dir), f"LoRA keys do not match the UNet ({result.unexpected_keys[:3]})", "use a LoRA trained on this model")


def load_configured_pipeline(cfg, *, device=None, dtype: torch.dtype | None = None):
    """:func:`load_pipeline` for a :class:`pxpo.config.Config`: its ``model`` section and ``sample.sampler``.

    ``device``: default CUDA when present, else CPU. ``dtype``: default
    :func:`resolve_dtype` of ``model.dtype`` on that device.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return load_pipeline(
        cfg.model.path,
        revision=cfg.model.revision,
        variant=cfg.model.variant,
        dtype=dtype if dtype is not None else resolve_dtype(cfg.model.dtype, device),
        device=device,
        sampler=cfg.sample.sampler,
    )


def load_policy_into(pipe, policy_dir: str | Path | None) -> None:
    """Apply a trained policy (a ``pxpo train`` / ``pxpo run`` output) to a loaded pipeline.

    Accepts the output directory (with ``lora/`` or ``model/unet/``), a LoRA
    directory (``pytorch_lora_weights.safetensors``) or a UNet directory.
    ``None`` leaves the base model.
    """
    if policy_dir is None:
        return
    d = Path(policy_dir)
    if (d / "lora" / "pytorch_lora_weights.safetensors").is_file():
        pipe.load_lora_weights(str(d / "lora"))
    elif (d / "pytorch_lora_weights.safetensors").is_file():
        pipe.load_lora_weights(str(d))
    elif (d / "model" / "unet" / "config.json").is_file() or (d / "config.json").is_file():
        from diffusers import UNet2DConditionModel

        unet_dir = d / "model" / "unet" if (d / "model" / "unet").is_dir() else d
        unet = UNet2DConditionModel.from_pretrained(str(unet_dir), torch_dtype=pipe.unet.dtype)
        pipe.unet = unet.to(pipe.unet.device).eval().requires_grad_(False)
    else:
        raise PxpoInputError(
            str(d),
            "no policy found (expected lora/pytorch_lora_weights.safetensors or model/unet/)",
            "pass the output directory of `pxpo train` or `pxpo run`",
        )
