"""The trajectory artifact shared by the sample, label and train stages.

Format ``pxpo-trajectories`` version 1 (documented in docs/trajectory-format.md)::

    <dir>/
      trajectories.safetensors   latents (N, T+1, C, h, w) f32, x_T .. x_0
                                 log_probs (N, T, C, h, w) f32, per element
                                 timesteps (T,) i64, in sampling order
                                 prompt_embeds (N, L, D) f32
                                 negative_prompt_embeds (1, L, D) f32
                                 optional (SDXL; absent for SD 1.x/2.x):
                                 pooled_prompt_embeds (N, P) f32,
                                 negative_pooled_prompt_embeds (1, P) f32,
                                 time_ids (N, 6) f32, negative_time_ids (1, 6) f32
      samples.jsonl              {"index", "prompt", "seed", "image"} per sample; with aligned
                                 pairs (meta "pairs") also "pair" (p = index // 2) and "side" ("A" / "B")
      images/000000.png ...      decoded x_0, 8-bit RGB
      meta.json                  model, sampler, scheduler config, steps, eta,
                                 guidance scale, negative prompt, pxpo version
      reward_maps.safetensors    (written by `pxpo label`) maps (N, H, W) f32
      preference_maps.safetensors  (pairs of samples; issue 24) maps (P, H, W) f32 in [-1, 1],
                                 pairs (P, 2) i64 sample indices [A, B]

Writers go through :func:`pxpo.storage.atomic_dir` / ``atomic_file``; readers
validate shapes and finiteness and name the file and field on error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .core.policy import Cond
from .errors import PxpoInputError
from .storage import atomic_dir, atomic_file

FORMAT = "pxpo-trajectories"
FORMAT_VERSION = 1
TENSORS = "trajectories.safetensors"
MAPS = "reward_maps.safetensors"
OPTIONAL = ("pooled_prompt_embeds", "negative_pooled_prompt_embeds", "time_ids", "negative_time_ids")  # None unless the model uses them
PER_SAMPLE = ("latents", "log_probs", "prompt_embeds", "pooled_prompt_embeds", "time_ids", "prompts", "seeds")


@dataclass
class Trajectories:
    """In-memory form of the artifact.

    Attributes:
        latents: (N, T+1, C, h, w); log_probs: (N, T, C, h, w); timesteps: (T,).
        prompt_embeds: (N, L, D); negative_prompt_embeds: (1, L, D).
        prompts: N strings; seeds: N ints (each sample's noise seed).
        images: (N, 3, H, W) float in [0, 1], quantised to 8 bits.
        meta: sampler settings (see module docstring).
        pooled_prompt_embeds: (N, P) or None; negative_pooled_prompt_embeds: (1, P) or None.
        time_ids: (N, 6) or None; negative_time_ids: (1, 6) or None (SDXL's added time ids).
    """

    latents: torch.Tensor
    log_probs: torch.Tensor
    timesteps: torch.Tensor
    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor
    prompts: list[str]
    seeds: list[int]
    images: torch.Tensor
    meta: dict = field(default_factory=dict)
    pooled_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None
    negative_time_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.latents.shape[0]

    def cond(self, idx=slice(None)) -> Cond:
        """The conditioning of samples ``idx``: embeds (B, L, D), pooled (B, P) / time_ids (B, 6) or None."""
        pooled, time_ids = self.pooled_prompt_embeds, self.time_ids
        return Cond(self.prompt_embeds[idx], None if pooled is None else pooled[idx], None if time_ids is None else time_ids[idx])

    def uncond(self) -> Cond:
        """The negative prompt's conditioning (1 row)."""
        return Cond(self.negative_prompt_embeds, self.negative_pooled_prompt_embeds, self.negative_time_ids)

    def select(self, part) -> Trajectories:
        """Samples ``part`` (a slice) of every per-sample field; images too when there is one per sample."""
        import dataclasses

        per_sample = {f: (None if getattr(self, f) is None else getattr(self, f)[part]) for f in PER_SAMPLE}
        images = self.images[part] if self.images.shape[0] == len(self) else self.images
        return dataclasses.replace(self, **per_sample, images=images)


def quantize_images(images: torch.Tensor) -> torch.Tensor:
    """Round images (B, 3, H, W) in [0, 1] to 8-bit levels, as a PNG stores them."""
    return (images.clamp(0, 1) * 255).round() / 255


def _to_png(img: torch.Tensor, path: Path) -> None:
    from PIL import Image

    arr = (img.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    Image.fromarray(arr).save(path)


def make_meta(*, model_path, revision, scheduler_config, num_steps, eta, guidance_scale, negative_prompt, sampler="ddim"):
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "pxpo_version": __version__,
        "model": {"path": str(model_path), "revision": revision},
        "sampler": sampler,
        "scheduler": dict(scheduler_config),
        "num_steps": num_steps,
        "eta": eta,
        "guidance_scale": guidance_scale,
        "negative_prompt": negative_prompt,
    }


def save_trajectories(traj: Trajectories, out_dir: Path) -> None:
    """Write the artifact atomically (replacing an existing one only when complete)."""
    from safetensors.torch import save_file

    with atomic_dir(Path(out_dir)) as tmp:
        save_file(
            {
                "latents": traj.latents.float().contiguous().cpu(),
                "log_probs": traj.log_probs.float().contiguous().cpu(),
                "timesteps": traj.timesteps.long().contiguous().cpu(),
                "prompt_embeds": traj.prompt_embeds.float().contiguous().cpu(),
                "negative_prompt_embeds": traj.negative_prompt_embeds.float().contiguous().cpu(),
                **{k: getattr(traj, k).float().contiguous().cpu() for k in OPTIONAL if getattr(traj, k) is not None},
            },
            str(tmp / TENSORS),
            metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)},
        )
        (tmp / "images").mkdir()
        lines, paired = [], "pairs" in traj.meta
        for i, (prompt, seed) in enumerate(zip(traj.prompts, traj.seeds)):
            name = f"images/{i:06d}.png"
            _to_png(traj.images[i], tmp / name)
            rec = {"index": i, "prompt": prompt, "seed": int(seed), "image": name}
            if paired:  # aligned pairs (sample.pairs): sample 2p is pair p's A, 2p + 1 its B
                rec.update(pair=i // 2, side="AB"[i % 2])
            lines.append(json.dumps(rec))
        (tmp / "samples.jsonl").write_text("\n".join(lines) + "\n")
        meta = dict(traj.meta)
        meta.update(
            num_samples=len(traj),
            latent_shape=list(traj.latents.shape[2:]),
            image_shape=list(traj.images.shape[1:]),
        )
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")


def _load_images(d: Path, records: list[dict]) -> torch.Tensor:
    from PIL import Image

    out = []
    for r in records:
        f = d / r["image"]
        try:
            arr = np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255.0
        except (OSError, ValueError) as e:
            raise PxpoInputError(str(f), f"unreadable image ({e})", "re-run `pxpo sample` to rewrite the artifact") from None
        out.append(torch.from_numpy(arr).permute(2, 0, 1))
    return torch.stack(out)


def load_trajectories(d: Path, with_images: bool = True) -> Trajectories:
    """Read and check an artifact written by :func:`save_trajectories`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(d)
    fix = "pass a directory written by `pxpo sample`"
    for name in (TENSORS, "samples.jsonl", "meta.json"):
        if not (d / name).is_file():
            raise PxpoInputError(str(d / name), "missing", fix)
    try:
        meta = json.loads((d / "meta.json").read_text())
    except json.JSONDecodeError as e:
        raise PxpoInputError(str(d / "meta.json"), f"not valid JSON ({e.msg})", fix) from None
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise PxpoInputError(
            str(d / "meta.json"),
            f"format {meta.get('format')!r} v{meta.get('format_version')} is not {FORMAT} v{FORMAT_VERSION}",
            "re-sample with this pxpo version",
        )
    try:
        t = load_file(str(d / TENSORS))
    except (SafetensorError, OSError) as e:
        raise PxpoInputError(str(d / TENSORS), f"unreadable ({e})", fix) from None
    for k in ("latents", "log_probs", "timesteps", "prompt_embeds", "negative_prompt_embeds"):
        if k not in t:
            raise PxpoInputError(f"{d / TENSORS}: {k}", "tensor missing", fix)
    n, t1 = t["latents"].shape[:2]
    checks = {
        "log_probs": (n, t1 - 1, *t["latents"].shape[2:]),
        "timesteps": (t1 - 1,),
    }
    for k, shape in checks.items():
        if tuple(t[k].shape) != shape:
            raise PxpoInputError(f"{d / TENSORS}: {k}", f"shape {tuple(t[k].shape)}, expected {shape}", fix)
    for k in ("prompt_embeds", "pooled_prompt_embeds", "time_ids"):
        if k in t and t[k].shape[0] != n:
            raise PxpoInputError(f"{d / TENSORS}: {k}", f"{t[k].shape[0]} rows for {n} samples", fix)
    for k in ("latents", "log_probs"):
        if not torch.isfinite(t[k]).all():
            raise PxpoInputError(f"{d / TENSORS}: {k}", "contains NaN or inf", "re-sample (check the model and eta)")
    records = []
    for i, line in enumerate((d / "samples.jsonl").read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise PxpoInputError(f"{d / 'samples.jsonl'}:{i}", f"not valid JSON ({e.msg})", fix) from None
    if len(records) != n:
        raise PxpoInputError(str(d / "samples.jsonl"), f"{len(records)} lines for {n} samples", fix)
    images = _load_images(d, records) if with_images else torch.empty(0)
    return Trajectories(
        latents=t["latents"],
        log_probs=t["log_probs"],
        timesteps=t["timesteps"],
        prompt_embeds=t["prompt_embeds"],
        negative_prompt_embeds=t["negative_prompt_embeds"],
        prompts=[r["prompt"] for r in records],
        seeds=[int(r["seed"]) for r in records],
        images=images,
        meta=meta,
        **{k: t.get(k) for k in OPTIONAL},
    )


def check_reward_maps(maps: torch.Tensor, n: int, hw: tuple[int, int], where: str) -> None:
    """Raise :class:`PxpoInputError` unless ``maps`` is a floating-point (n, H, W) tensor, finite.

    Integer or bool maps (e.g. int8) are refused rather than converted: their
    scale (is 127 a reward of 127 or of 1.0?) is not known here.
    """
    if not maps.is_floating_point():
        raise PxpoInputError(
            where,
            f"reward maps are {str(maps.dtype).replace('torch.', '')}, not floating point (rewards are real-valued; an integer map's scale is ambiguous)",
            "store the maps as float32 (e.g. `maps.float() / 127` for int8 maps quantised from [-1, 1]), or re-run `pxpo label`",
        )
    if maps.ndim != 3 or maps.shape[0] != n or tuple(maps.shape[1:]) != tuple(hw):
        raise PxpoInputError(
            where,
            f"reward maps have shape {tuple(maps.shape)}, expected ({n}, {hw[0]}, {hw[1]}): one (H, W) map per sample",
            "make the labeller return (B, H, W) maps at the image resolution",
        )
    if not torch.isfinite(maps).all():
        bad = (~torch.isfinite(maps)).flatten(1).any(1).nonzero().flatten().tolist()
        raise PxpoInputError(where, f"reward maps contain NaN or inf (samples {bad[:10]})", "fix the labeller so every value is finite")


def save_reward_maps(d: Path, maps: torch.Tensor, info: dict) -> None:
    """Write ``reward_maps.safetensors`` (maps (N, H, W)) beside the trajectories, atomically."""
    from safetensors.torch import save

    with atomic_file(Path(d) / MAPS, "wb") as f:
        f.write(save({"maps": maps.float().contiguous().cpu()}, metadata={"info": json.dumps(info, default=str)}))


def load_reward_maps(d: Path, n: int, hw: tuple[int, int]) -> tuple[torch.Tensor, dict]:
    """Read and check ``reward_maps.safetensors``: (N, H, W) finite maps."""
    from safetensors import SafetensorError, safe_open

    f = Path(d) / MAPS
    if not f.is_file():
        raise PxpoInputError(str(f), "missing", "run `pxpo label` on this trajectory directory first")
    try:
        with safe_open(str(f), "pt") as fh:
            maps = fh.get_tensor("maps")
            info = json.loads((fh.metadata() or {}).get("info", "{}"))
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise PxpoInputError(str(f), f"unreadable ({e})", "re-run `pxpo label`") from None
    check_reward_maps(maps, n, hw, str(f))
    return maps.float(), info


PREFERENCES = "preference_maps.safetensors"


def save_preference_maps(d: Path, maps: torch.Tensor, pairs: torch.Tensor, info: dict) -> None:
    """Write ``preference_maps.safetensors`` beside the trajectories, atomically.

    ``maps``: (P, H, W) float in [-1, 1] at image resolution, one per pair: +1 where
    the pair's image A is better, -1 where B is, 0 no preference.
    ``pairs``: (P, 2) int64 sample indices ``[A, B]`` into this trajectory directory.
    """
    from safetensors.torch import save

    where = str(Path(d) / PREFERENCES)
    check_preference_maps(maps, pairs, where)
    tensors = {"maps": maps.float().contiguous().cpu(), "pairs": pairs.long().contiguous().cpu()}
    with atomic_file(Path(d) / PREFERENCES, "wb") as f:
        f.write(save(tensors, metadata={"info": json.dumps(info, default=str)}))


def check_preference_maps(maps: torch.Tensor, pairs: torch.Tensor, where: str, hw: tuple[int, int] | None = None) -> None:
    """Raise :class:`PxpoInputError` unless ``maps`` (P, H, W) are finite floats in [-1, 1] and ``pairs`` is (P, 2)."""
    if not maps.is_floating_point() or maps.ndim != 3:
        raise PxpoInputError(where, f"preference maps are {tuple(maps.shape)} {maps.dtype}, expected float (P, H, W)",
                             "store one float32 (H, W) map per pair")
    if pairs.ndim != 2 or pairs.shape != (maps.shape[0], 2):
        raise PxpoInputError(where, f"pairs have shape {tuple(pairs.shape)}, expected ({maps.shape[0]}, 2): [A, B] per map",
                             "store the sample indices of each pair's two images")
    if hw is not None and tuple(maps.shape[1:]) != tuple(hw):
        raise PxpoInputError(where, f"preference maps are {tuple(maps.shape[1:])}, the images {tuple(hw)}",
                             "label the pairs of this trajectory directory")
    if maps.numel() and (not torch.isfinite(maps).all() or maps.abs().max() > 1 + 1e-6):
        raise PxpoInputError(where, "preference maps must be finite and in [-1, 1]", "clip or rescale them to [-1, 1]")


def load_preference_maps(d: Path, hw: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Read and check ``preference_maps.safetensors``: maps (P, H, W) in [-1, 1], pairs (P, 2), info."""
    from safetensors import SafetensorError, safe_open

    f = Path(d) / PREFERENCES
    if not f.is_file():
        raise PxpoInputError(str(f), "missing", "label the pairs first (`pxpo label` with train.algorithm a preference one, "
                             "or `pxpo label-studio pull` of a pairwise project)")
    try:
        with safe_open(str(f), "pt") as fh:
            maps, pairs = fh.get_tensor("maps"), fh.get_tensor("pairs")
            info = json.loads((fh.metadata() or {}).get("info", "{}"))
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise PxpoInputError(str(f), f"unreadable ({e})", "label the pairs again") from None
    check_preference_maps(maps, pairs, str(f), hw)
    return maps.float(), pairs.long(), info
