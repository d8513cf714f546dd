"""``pxpo pairs import``: a team's own image pairs -> a trajectory directory ``train.algorithm=diffusion_dpo`` trains on.

Input (issue 24, item 3: offline pairs a team already has):

* ``--images DIR``: the images, any format PIL reads (RGB; an alpha channel is dropped);
* ``--prefs FILE``: one record per pair, ``.jsonl`` (one JSON object a line) or ``.csv``
  (a header row; an empty cell is an absent field). Fields:

  ============== ======================================================================
  ``prompt``     the prompt both images were made for (a string)
  ``a``, ``b``   the two images, paths relative to ``--images``
  ``preference`` one preference for the whole pair: a number in [-1, 1] (+1: A is
                 better, -1: B is, 0: no preference) or ``"A"`` / ``"B"`` / ``"tie"``
  ``map``        or a preference map, a path relative to ``--images``: an 8-bit
                 grayscale image, m = clip((v - 128) / 127, -1, 1) (255: A better,
                 128: no preference, 0: B better), or a ``.npy`` float (H, W) in [-1, 1];
                 the size of the pair's images
  ============== ======================================================================

  Each record has exactly one of ``preference`` and ``map``.

Output (docs/trajectory-format.md, "Pairs from elsewhere"): pair p is samples 2p (A) and
2p + 1 (B); ``latents[:, -1]`` are the VAE's encodings (the latent distribution's mean, x
``scaling_factor``, after ``shift_factor``) of the images with the configured model
(``model.path``), ``prompt_embeds`` its text encoder's; the earlier latents and ``log_probs`` are
zeros (diffusion_dpo does not read them); ``timesteps`` and ``meta.json``'s sampler fields are
the config's (``pxpo train`` checks them); ``meta.json`` ``imported`` says where the pairs came
from, and ``pxpo train`` trains such a directory with ``diffusion_dpo`` only.
``preference_maps.safetensors`` holds each pair's map (a whole-image preference: that
constant). The directory is written whole or not at all.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from ..config import Config
from ..errors import PxpoInputError
from ..storage import jsonl_objects

FIELDS = ("prompt", "a", "b", "preference", "map")
WORDS = {"a": 1.0, "b": -1.0, "tie": 0.0, "none": 0.0}
ENCODE_BATCH = 8  # images per VAE / text-encoder call


def read_prefs(path: Path) -> list[dict]:
    """The records of ``path`` (.jsonl or .csv) with absent fields dropped; checks each one's fields."""
    fix = "write one record per pair with prompt, a, b and one of preference / map (docs/trajectory-format.md)"
    if not path.is_file():
        raise PxpoInputError(str(path), "not found", "pass the pairs' preference file (.jsonl or .csv) with --prefs")
    text = path.read_text(encoding="utf-8")
    rows: list[tuple[str, dict]] = []
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        missing = {"prompt", "a", "b"} - set(reader.fieldnames or ())
        if missing:
            raise PxpoInputError(str(path), f"the header lacks the column(s) {sorted(missing)}", fix)
        for i, r in enumerate(reader, 2):
            rows.append((f"{path}:{i}", {k: v for k, v in r.items() if k in FIELDS and v not in (None, "")}))
    elif path.suffix.lower() in (".jsonl", ".ndjson"):
        for i, r in jsonl_objects(text, path, fix):
            if not isinstance(r, dict):
                raise PxpoInputError(f"{path}:{i}", f"a {type(r).__name__}, not an object", fix)
            rows.append((f"{path}:{i}", {k: v for k, v in r.items() if k in FIELDS and v is not None}))
    else:
        raise PxpoInputError(str(path), f"unknown format {path.suffix!r}", "use a .jsonl or .csv file")
    if not rows:
        raise PxpoInputError(str(path), "no pairs", fix)
    return [check_record(where, r) for where, r in rows]


def check_record(where: str, r: dict) -> dict:
    """One record's fields, checked: prompt (str), a, b (paths), and preference (float in [-1, 1]) or map (path)."""
    for k in ("prompt", "a", "b"):
        if k not in r:
            raise PxpoInputError(f"{where}: {k}", "missing", "give every pair its prompt and its two images a and b")
        if not isinstance(r[k], str) or (k != "prompt" and not r[k].strip()):
            raise PxpoInputError(f"{where}: {k}", f"{r[k]!r} is not a {'string' if k == 'prompt' else 'file path'}", f"write {k} as a string")
    has_pref, has_map = "preference" in r, "map" in r
    if has_pref == has_map:
        raise PxpoInputError(f"{where}", "has both a preference and a map" if has_pref else "has neither a preference nor a map",
                             "give each pair one: preference (-1..1, or A / B / tie) for the whole pair, or map (an image of the pair's size)")
    out = {"prompt": r["prompt"], "a": r["a"], "b": r["b"]}
    if has_map:
        out["map"] = str(r["map"])
        return out
    v = r["preference"]
    if isinstance(v, str):
        word = v.strip().lower()
        try:
            v = WORDS[word] if word in WORDS else float(word)
        except ValueError:
            raise PxpoInputError(f"{where}: preference", f"{r['preference']!r} is not a number or A / B / tie", "write 1 (A better), -1 (B better), 0, A, B or tie") from None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or abs(v) > 1:
        raise PxpoInputError(f"{where}: preference", f"{r['preference']!r} is not in [-1, 1]", "write +1 where A is better, -1 where B is, 0 for a tie")
    out["preference"] = float(v)
    return out


def _open(path: Path, where: str):
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise PxpoInputError(where, f"{path} not found", "paths are relative to --images; check the file name")
    try:
        img = Image.open(path)
        img.load()
        return img
    except (OSError, UnidentifiedImageError) as e:
        raise PxpoInputError(where, f"{path} is not a readable image ({e})", "pass a PNG, JPEG or another image PIL reads") from None


def load_rgb(path: Path, where: str, hw: tuple[int, int], resize: bool) -> tuple[torch.Tensor, tuple[int, int]]:
    """An image file -> ((3, H, W) float in [0, 1] at ``hw``, its own (H, W)); refuses another size unless ``resize``."""
    from PIL import Image

    img = _open(path, where).convert("RGB")
    own = (img.height, img.width)
    if own != tuple(hw):
        if not resize:
            raise PxpoInputError(where, f"{path} is {own[0]} x {own[1]}, the model makes {hw[0]} x {hw[1]} images",
                                 "resize the images to the model's resolution, or pass --resize")
        img = img.resize((hw[1], hw[0]), Image.Resampling.LANCZOS)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(arr.copy()).permute(2, 0, 1), own


def load_map(path: Path, where: str, own: tuple[int, int], hw: tuple[int, int]) -> torch.Tensor:
    """A preference map file (8-bit grayscale image or .npy) of size ``own`` (the pair's images) -> (H, W) in [-1, 1] at ``hw``."""
    import torch.nn.functional as F

    fix = "store the map at the pair's image size: 8-bit grayscale (255 A better, 128 none, 0 B better) or a .npy float array in [-1, 1]"
    if path.suffix.lower() == ".npy":
        if not path.is_file():
            raise PxpoInputError(where, f"{path} not found", "paths are relative to --images; check the file name")
        try:
            m = torch.from_numpy(np.load(path, allow_pickle=False).astype(np.float32))
        except (OSError, ValueError) as e:
            raise PxpoInputError(where, f"{path} is not a readable .npy array ({e})", fix) from None
        if m.ndim != 2 or not torch.isfinite(m).all() or m.abs().max() > 1 + 1e-6:
            raise PxpoInputError(where, f"{path}: shape {tuple(m.shape)}; values must be finite and in [-1, 1]", fix)
    else:
        img = _open(path, where)
        if img.mode not in ("L", "P", "1"):
            raise PxpoInputError(where, f"{path} is a {img.mode} image, not grayscale", fix)
        m = ((torch.from_numpy(np.asarray(img.convert("L"), dtype=np.float32).copy()) - 128.0) / 127.0).clamp(-1, 1)
    if tuple(m.shape) != tuple(own):
        raise PxpoInputError(where, f"{path} is {m.shape[0]} x {m.shape[1]}, the pair's images {own[0]} x {own[1]}", fix)
    if tuple(m.shape) != tuple(hw):  # the images were resized (--resize): the map with them
        m = F.interpolate(m[None, None], size=tuple(hw), mode="bilinear", align_corners=False)[0, 0].clamp(-1, 1)
    return m


@torch.no_grad()
def encode_images(vae, images: torch.Tensor) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] -> scaled latents (N, C, h, w): the VAE's mean, the inverse of
    :func:`pxpo.core.sampling.decode_latents` ((z - shift_factor) x scaling_factor)."""
    out = []
    for i in range(0, len(images), ENCODE_BATCH):
        x = (images[i : i + ENCODE_BATCH] * 2 - 1).to(vae.device, vae.dtype)
        enc = vae.encode(x)
        z = enc.latent_dist.mean if hasattr(enc, "latent_dist") else enc.latents
        shift = getattr(vae.config, "shift_factor", None)
        if shift:
            z = z - shift
        out.append((z * vae.config.scaling_factor).float().cpu())
    return torch.cat(out)


def import_pairs(cfg: Config, images: Path, prefs: Path, out: Path, *, resize: bool = False) -> dict:
    """Write the trajectory directory ``out`` of the pairs in ``prefs`` (module docstring).

    Returns ``{"num_pairs", "num_maps", "num_whole", "preference_mean", "out", "image_hw", "train_overrides"}``
    (``train_overrides``: the settings ``pxpo train`` needs for one epoch of these pairs: ``sample.*``, and a
    ``train.batch_size`` dividing the samples when the config's does not).
    """
    from ..core.policies import make_policy
    from ..core.policy import Cond
    from ..core.preference import aligned_pairs
    from ..core.sampling import encode_cond, latent_hw
    from ..models import load_configured_pipeline
    from ..storage import atomic_dir
    from ..trajectories import Trajectories, make_meta, quantize_images, save_preference_maps, save_trajectories

    images, prefs = Path(images), Path(prefs)
    if not images.is_dir():
        raise PxpoInputError(str(images), "not a directory", "pass the folder holding the pairs' images with --images")
    records = read_prefs(prefs)
    pipe = load_configured_pipeline(cfg)
    net_hw = latent_hw(pipe.unet.config)
    hw = (net_hw[0] * pipe.vae_scale_factor, net_hw[1] * pipe.vae_scale_factor)
    rows, maps = [], []
    for i, r in enumerate(records):
        where = f"{prefs} pair {i}"
        a, own_a = load_rgb(images / r["a"], f"{where}: a", hw, resize)
        b, own_b = load_rgb(images / r["b"], f"{where}: b", hw, resize)
        if own_a != own_b:
            raise PxpoInputError(f"{where}: b", f"{r['b']} is {own_b[0]} x {own_b[1]}, A ({r['a']}) {own_a[0]} x {own_a[1]}",
                                 "give the two images of a pair one size")
        rows += [a, b]
        maps.append(load_map(images / r["map"], f"{where}: map", own_a, hw) if "map" in r else torch.full(hw, r["preference"]))
    x = quantize_images(torch.stack(rows))
    prompts = [r["prompt"] for r in records for _ in range(2)]
    latents = encode_images(pipe.vae, x)
    s = cfg.sample
    conds = Cond.cat([encode_cond(pipe, prompts[i : i + ENCODE_BATCH], max_sequence_length=s.max_sequence_length).to("cpu", torch.float32)
                      for i in range(0, len(prompts), ENCODE_BATCH)])
    neg = encode_cond(pipe, [cfg.prompts.negative_prompt], negative=True, max_sequence_length=s.max_sequence_length).to("cpu", torch.float32)
    timesteps = make_policy(s, pipe.scheduler).timesteps.clone()
    n, t = len(prompts), len(timesteps)
    steps = torch.zeros((n, t + 1, *latents.shape[1:]))
    steps[:, -1] = latents  # diffusion_dpo reads only the clean latents
    meta = make_meta(model_path=cfg.model.path, revision=cfg.model.revision, scheduler_config=pipe.scheduler.config, num_steps=s.num_steps,
                     eta=s.eta, guidance_scale=s.guidance_scale, negative_prompt=cfg.prompts.negative_prompt, sampler=s.sampler)
    meta.update(pairs={"shared_steps": None}, policy=None, epoch=0,
                imported={"images": str(images), "prefs": str(prefs), "latents": "vae latent_dist mean", "resized": resize})
    traj = Trajectories(
        latents=steps, log_probs=torch.zeros((n, t, *latents.shape[1:])), timesteps=timesteps, prompt_embeds=conds.embeds,
        negative_prompt_embeds=neg.embeds, prompts=prompts, seeds=[-1] * n, images=x, meta=meta,
        pooled_prompt_embeds=conds.pooled, negative_pooled_prompt_embeds=neg.pooled, time_ids=conds.time_ids, negative_time_ids=neg.time_ids,
    )
    pm = torch.stack(maps).float()
    n_maps = sum("map" in r for r in records)
    info = {"source": "import", "prefs": str(prefs), "images": str(images), "maps": n_maps, "whole": len(records) - n_maps}
    with atomic_dir(Path(out)) as tmp:  # the trajectories and their maps appear together or not at all
        save_trajectories(traj, tmp)  # (itself atomic: replaces the empty tmp with the complete directory)
        save_preference_maps(tmp, pm, aligned_pairs(n), info)
    train_over = ["sample.pairs=true", f"sample.batch_size={n}", "sample.num_batches=1"]
    if n % cfg.train.batch_size:  # the largest even micro-batch up to train.batch_size that divides the pairs' samples
        train_over.append(f"train.batch_size={max(b for b in range(2, max(2, cfg.train.batch_size) + 1, 2) if n % b == 0)}")
    return {
        "num_pairs": len(records), "num_maps": n_maps, "num_whole": len(records) - n_maps, "preference_mean": float(pm.mean()),
        "out": str(out), "image_hw": list(hw), "train_overrides": train_over,
    }
