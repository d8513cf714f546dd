"""``pxpo base build`` / ``pxpo base distill-lcm``: the embedded default model (built offline)."""

from __future__ import annotations

from pathlib import Path

from ..errors import PxpoInputError


BASE_ARCHS = ("sd", "sd3")  # the SD 1.x-style default (UNet, DDIM) and the SD3-style flow default


def default_out(arch: str) -> str:
    """Where ``pxpo base build --arch ARCH`` writes without ``--out``."""
    return "models/sd3" if arch == "sd3" else "models/base"


def build_base_model(out: Path, *, arch: str = "sd", seed: int = 0, vae_steps: int | None = None, unet_steps: int | None = None,
                     text_lr_mult: float | None = None, force: bool = False, progress: bool = True) -> dict | None:
    """Build and pretrain the embedded default at ``out``; None when it exists and ``force`` is off.

    ``arch``: ``"sd"`` (a StableDiffusionPipeline) or ``"sd3"`` (a StableDiffusion3Pipeline,
    :mod:`pxpo.embedded.sd3`; ``unet_steps`` is then the transformer's flow-matching steps).
    Returns the build figures (``prompt_following_accuracy``, ``total_seconds``, ...).
    """
    out = Path(out)
    if arch not in BASE_ARCHS:
        raise PxpoInputError(f"--arch {arch}", "unknown architecture", f"use one of {', '.join(BASE_ARCHS)}")
    if (out / "model_index.json").exists() and not force:
        if arch == "sd":
            _check_existing_spec(out, seed, vae_steps, unet_steps, text_lr_mult)
        return None
    if arch == "sd3":
        from ..embedded.sd3 import SD3Spec, build_sd3_base

        if text_lr_mult is not None:
            raise PxpoInputError("--text-lr-mult", "not used by --arch sd3", "leave it out")
        spec3 = SD3Spec(seed=seed)
        spec3.vae_steps = spec3.vae_steps if vae_steps is None else vae_steps
        spec3.flow_steps = spec3.flow_steps if unet_steps is None else unet_steps
        return build_sd3_base(out, spec3, progress=progress)
    from ..embedded.architecture import BaseModelSpec
    from ..embedded.pretrain import build_base

    spec = BaseModelSpec(seed=seed)
    for name, value in (("vae_steps", vae_steps), ("unet_steps", unet_steps), ("text_lr_mult", text_lr_mult)):
        if value is not None:
            setattr(spec, name, value)
    return build_base(out, spec, progress=progress)


def _check_existing_spec(out: Path, seed: int, vae_steps, unet_steps, text_lr_mult) -> None:
    """Refuse to reuse the model at ``out`` when its ``build.json`` says it was built with another spec than asked for.

    The repository keeps the default build (models/base) under version control, so `pxpo base build`
    with the default spec reuses it; a different budget or seed must rebuild (``--force``).
    """
    import json
    from dataclasses import asdict

    from ..embedded.architecture import BaseModelSpec

    f = out / "build.json"
    if not f.is_file():
        return  # a model from elsewhere (no build record): reuse it as it is
    try:
        built = json.loads(f.read_text())["spec"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PxpoInputError(str(f), f"unreadable build record ({exc})", "rebuild with `pxpo base build --force`") from None
    want = BaseModelSpec(seed=seed)
    for name, value in (("vae_steps", vae_steps), ("unet_steps", unet_steps), ("text_lr_mult", text_lr_mult)):
        if value is not None:
            setattr(want, name, value)
    want = json.loads(json.dumps(asdict(want)))  # tuples as lists, as build.json stores them
    differ = sorted(k for k in want if built.get(k) != want[k])
    if differ:
        got = ", ".join(f"{k}={built.get(k)!r} (asked {want[k]!r})" for k in differ)
        raise PxpoInputError(str(f), f"the model at {out} was built with another spec: {got}",
                             f"rebuild it with `pxpo base build --force --out {out}` (or pass the spec it was built with)")


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
