"""Loading diffusers pipelines and attaching / saving LoRA adapters.

One loading path for every model: ``from_pretrained`` of the pipeline class
the ``model_index.json`` calls for (:func:`pipeline_class`: SD 1.x/2.x, SDXL)
on a local directory (the embedded default, a user's checkout) or a hub id.
The scheduler is converted to the sampler's (DDIM for the policy in
ALGORITHMS.md section 1, LCM for RLCM) with the same config.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import PxpoInputError

LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
# SD3 transformers: both streams of the joint attention (diffusers' SD3 DreamBooth LoRA, Flow-GRPO's SD3 configs)
LORA_TARGETS_SD3 = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]


def is_sd3(net) -> bool:
    """Whether the network (possibly DDP-wrapped) is an SD3 transformer (LoRA targets and format differ)."""
    from diffusers import SD3Transformer2DModel

    from .core.policy import base_network

    return isinstance(base_network(net), SD3Transformer2DModel)


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """``auto`` is float32 on CPU and float16 on CUDA."""
    if name == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def _looks_local(path: str) -> bool:
    p = Path(path)
    return p.exists() or path.startswith((".", "/", "~")) or path.count("/") != 1


def pipeline_class(model_index: dict):
    """The diffusers pipeline class for a ``model_index.json``: SDXL (two text encoders and a UNet),
    the class it names for transformer (flow) models, else StableDiffusionPipeline (SD 1.x/2.x, LCM)."""
    import diffusers

    if "unet" in model_index and model_index.get("text_encoder_2", [None])[0]:
        return diffusers.StableDiffusionXLPipeline
    if "transformer" in model_index:
        return getattr(diffusers, model_index.get("_class_name", "DiffusionPipeline"), diffusers.DiffusionPipeline)
    return diffusers.StableDiffusionPipeline


def load_pipeline(path: str, *, revision=None, variant=None, dtype=torch.float32, device="cpu", sampler: str = "ddim"):
    """Load a diffusers text-to-image pipeline for RL fine-tuning.

    Args:
        path: diffusers pipeline directory or hub id (``org/name``): SD 1.x/2.x,
            SDXL (:func:`pipeline_class`), or an LCM checkout.
        dtype: dtype of the frozen VAE and text encoders (and the UNet's base
            weights when LoRA is used). A VAE with ``force_upcast`` (SDXL's)
            stays float32 under float16.
        sampler: ``sample.sampler``; the pipeline's scheduler is converted to
            that policy's ``scheduler_class`` (same config): DDIMScheduler for
            ``ddim``, LCMScheduler for ``lcm``.

    Returns:
        the pipeline on ``device`` with the sampler's scheduler, the VAE and
        text encoders frozen.

    Raises:
        PxpoInputError: the directory is missing or is not a loadable pipeline.
    """
    import diffusers

    from .core.policies import policy_class

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
    sched_name = policy_class(sampler).scheduler_class
    try:
        index = diffusers.DiffusionPipeline.load_config(path, revision=revision)
        cls = pipeline_class(index)
        extra = dict(safety_checker=None, requires_safety_checker=False) if "safety_checker" in index else {}
        # SD3 saved without T5: diffusers needs the missing encoder spelled out as None
        extra.update({k: None for k in ("text_encoder_3", "tokenizer_3") if k in index and not (index[k] or [None])[0]})
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipe = cls.from_pretrained(
                path,
                revision=revision,
                variant=variant,
                torch_dtype=dtype,  # `dtype` in diffusers >= 0.36; torch_dtype works in both
                **extra,
            )
    except Exception as e:  # diffusers raises OSError/ValueError/EnvironmentError/safetensors errors
        raise PxpoInputError(
            f"model.path={path}", f"could not be loaded as a diffusers pipeline ({type(e).__name__}: {e})".strip(), fix
        ) from None
    if sched_name is not None:
        pipe.scheduler = getattr(diffusers, sched_name).from_config(pipe.scheduler.config)
    for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.requires_grad_(False).eval()
    if dtype == torch.float16 and getattr(pipe.vae.config, "force_upcast", False):
        pipe.vae.to(torch.float32)  # SDXL's VAE overflows in float16 (diffusers upcasts it too)
    pipe.set_progress_bar_config(disable=True)
    if getattr(pipe, "unet", None) is None and getattr(pipe, "transformer", None) is not None:
        pipe.unet = pipe.transformer  # SD3: the loop calls the denoising network `unet` (the same module)
    return pipe.to(device)


def compile_network(net):
    """``torch.compile(net)`` (``train.compile``): the returned wrapper is what the denoisers call."""
    if not hasattr(torch, "compile"):
        raise PxpoInputError("train.compile", f"torch {torch.__version__} has no torch.compile", "set train.compile=false or upgrade torch")
    return torch.compile(net)


def add_lora(unet, rank: int, alpha: float) -> list[torch.nn.Parameter]:
    """Add a LoRA adapter (peft) to the UNet attention projections; freeze the rest.

    The adapter starts as the identity (B = 0). Trainable LoRA weights are kept
    in float32 even when the base weights are half precision.

    Returns:
        the trainable parameters.
    """
    from peft import LoraConfig

    unet.requires_grad_(False)
    targets = LORA_TARGETS_SD3 if is_sd3(unet) else LORA_TARGETS
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


def save_lora(unet, out_dir: Path) -> None:
    """Save the UNet's LoRA in the diffusers format ``pipe.load_lora_weights(dir)`` reads."""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    if is_sd3(unet):  # keys "transformer.*", as StableDiffusion3Pipeline.load_lora_weights reads them
        StableDiffusion3Pipeline.save_lora_weights(str(out_dir), transformer_lora_layers=get_peft_model_state_dict(unet), safe_serialization=True)
        return
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(str(out_dir), unet_lora_layers=state, safe_serialization=True)


def load_lora_into(unet, lora_dir: Path) -> None:
    """Load LoRA weights saved by :func:`save_lora` into a UNet that has an adapter."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import set_peft_model_state_dict

    f = Path(lora_dir) / "pytorch_lora_weights.safetensors"
    if not f.is_file():
        raise PxpoInputError(str(lora_dir), "no pytorch_lora_weights.safetensors", "pass the LoRA directory a train stage wrote")
    if is_sd3(unet):
        from diffusers import StableDiffusion3Pipeline

        state = StableDiffusion3Pipeline.lora_state_dict(str(lora_dir))
        state = {k.removeprefix("transformer."): v for k, v in state.items() if k.startswith("transformer.")}
    else:
        from diffusers.utils import convert_unet_state_dict_to_peft

        state, _ = StableDiffusionPipeline.lora_state_dict(str(lora_dir))
        state = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")})
    result = set_peft_model_state_dict(unet, state, adapter_name="default")
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
        unet_dir = d / "model" / "unet" if (d / "model" / "unet").is_dir() else d
        unet = type(pipe.unet).from_pretrained(str(unet_dir), torch_dtype=pipe.unet.dtype)  # UNet, or SD3 transformer
        pipe.unet = unet.to(pipe.unet.device).eval().requires_grad_(False)
        if getattr(pipe, "transformer", None) is not None:
            pipe.transformer = pipe.unet
    else:
        raise PxpoInputError(
            str(d),
            "no policy found (expected lora/pytorch_lora_weights.safetensors or model/unet/)",
            "pass the output directory of `pxpo train` or `pxpo run`",
        )
