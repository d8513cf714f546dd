"""``pxpo base build`` / ``pxpo base distill-lcm``: the embedded default model (built offline)."""

from __future__ import annotations

from pathlib import Path

from ..errors import PxpoInputError


def build_base_model(out: Path, *, seed: int = 0, vae_steps: int | None = None, unet_steps: int | None = None,
                     text_lr_mult: float | None = None, force: bool = False, progress: bool = True) -> dict | None:
    """Build and pretrain the embedded default at ``out``; None when it exists and ``force`` is off.

    Returns the build figures (``prompt_following_accuracy``, ``total_seconds``, ...).
    """
    from ..embedded.architecture import BaseModelSpec
    from ..embedded.pretrain import build_base

    out = Path(out)
    if (out / "model_index.json").exists() and not force:
        return None
    spec = BaseModelSpec(seed=seed)
    for name, value in (("vae_steps", vae_steps), ("unet_steps", unet_steps), ("text_lr_mult", text_lr_mult)):
        if value is not None:
            setattr(spec, name, value)
    return build_base(out, spec, progress=progress)


def distill_lcm_model(teacher: Path, out: Path, *, seed: int = 0, steps: int | None = None, force: bool = False,
                      progress: bool = True) -> dict | None:
    """Distil the teacher pipeline at ``teacher`` into a few-step consistency model at ``out``; None if it exists."""
    from ..embedded.lcm_distill import LCMSpec, build_lcm

    out, teacher = Path(out), Path(teacher)
    if (out / "model_index.json").exists() and not force:
        return None
    if not (teacher / "model_index.json").is_file():
        raise PxpoInputError(f"--teacher {teacher}", "not a diffusers pipeline directory", "run `pxpo base build` first")
    spec = LCMSpec(seed=seed)
    if steps is not None:
        spec.steps = steps
    return build_lcm(teacher, out, spec, progress=progress)


def save_random_model(out: Path, *, arch: str = "sd15", dtype: str = "float16", seed: int = 0, force: bool = False) -> dict | None:
    """Save a random-weight pipeline with ``arch``'s published shapes (a timing fixture); None if it exists."""
    from ..embedded.random_sd import save_random_pipeline

    out = Path(out)
    if (out / "model_index.json").exists() and not force:
        return None
    return save_random_pipeline(out, arch, dtype=dtype, seed=seed)
