"""Scalar reward models people use, through transformers: CLIP score / PickScore and aesthetic heads.

Both load with ``from_pretrained(path_or_hub_id)``, so a local directory
written by ``save_pretrained`` and a Hugging Face hub id go through the same
code; offline (``HF_HUB_OFFLINE=1`` or no network) a hub id that is not in the
cache is one :class:`~pxpo.errors.PxpoInputError` naming the id and the fix.
transformers is imported inside the factories.

* ``clip_score`` (``reward.kwargs``: ``model``, optional ``processor``): a
  ``CLIPModel`` scores each image against its prompt,
  ``logit_scale.exp() * cos(image embedding, prompt embedding)``: the CLIP
  score and, with ``model: yuvalkirstain/PickScore_v1`` and ``processor:
  laion/CLIP-ViT-H-14-laion2B-s32B-b79K``, PickScore (arXiv 2305.01569).
* ``aesthetic`` (``model``, ``head``): a CLIP image embedding (L2-normalised
  unless ``normalize: false``) through a stack of linear layers read from a
  safetensors file (``head``), LAION's aesthetic predictor being the usual one.
  Tensor names: ``<layer>.weight`` ``(out, in)`` and ``<layer>.bias``
  ``(out,)``, layers applied in the natural order of their names
  (``layers.0``, ``layers.2``, ..., ``layers.7``; a single ``weight`` /
  ``bias`` pair is a linear head). The first ``in`` is the model's
  ``projection_dim``, the last ``out`` is 1; ``activation`` (``none``, as
  LAION's MLP at evaluation, ``relu``, ``gelu``) goes between layers. LAION's
  ``sac+logos+ava1-l14-linearMSE.pth`` (on ``openai/clip-vit-large-patch14``)
  converts with ``safetensors.torch.save_file(torch.load(pth), "head.safetensors")``.

Each returns one scalar per image (a constant map); ``attribution`` gives
them pixel credit. Images ``(B, 3, H, W)`` in ``[0, 1]`` are resized,
centre-cropped and normalised as the model's image processor says (its
``size``, ``crop_size``, ``resample``, ``image_mean`` / ``image_std``), in
torch so that gradients flow (PIL's uint8 rounding aside, the processor's own
pixels). The model's weights are frozen; it follows the images' device.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from .core.rewards import LabelFn, register
from .errors import PxpoInputError

_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")
_MODES = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL's resample codes
ACTIVATIONS = {"none": None, "relu": F.relu, "gelu": F.gelu}


def load_clip(ref: Any, processor: Any = None, revision: Optional[str] = None, what: str = "reward.kwargs.model"):
    """``(CLIPModel, image processor, tokenizer)`` from a save_pretrained directory or a hub id; frozen, in eval mode."""
    if ref is None:
        raise PxpoInputError(what, "no CLIP model given", "set it to a directory saved with save_pretrained or a hub id (openai/clip-vit-base-patch32)")
    from transformers import AutoProcessor, CLIPModel

    model = _from_pretrained(CLIPModel, ref, revision, what)
    proc_what = what.rsplit(".", 1)[0] + ".processor" if processor is not None else what
    proc = _from_pretrained(AutoProcessor, processor if processor is not None else ref, revision, proc_what)
    image_processor = getattr(proc, "image_processor", proc)
    return model.eval().requires_grad_(False), image_processor, getattr(proc, "tokenizer", None)


def _from_pretrained(cls: Any, ref: Any, revision: Optional[str], what: str):
    ref = str(ref)
    local = Path(ref).expanduser()
    if local.is_dir():
        try:
            return cls.from_pretrained(str(local))
        except Exception as exc:  # a directory without the files, or of another model: one message
            raise PxpoInputError(what, f"{str(local)!r} holds no {cls.__name__} ({type(exc).__name__}: {_first_line(exc)})",
                                 "point it to a directory written by save_pretrained (the model and its processor)") from None
    if local.exists() or ref.startswith((".", "/", "~")) or not _HUB_ID.fullmatch(ref):
        raise PxpoInputError(what, f"{ref!r} is neither a directory nor a hub id", "give a directory written by save_pretrained or a hub id owner/name")
    fix = f"download it where there is network (hf download {ref}) and run again, or set {what} to a local directory written by save_pretrained"
    try:  # the local cache first: no network needed, and no retries when there is none
        return cls.from_pretrained(ref, revision=revision, local_files_only=True)
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise PxpoInputError(what, f"cannot load hub model {ref!r}: offline (HF_HUB_OFFLINE=1) and not in the local cache", fix)
    if (unreachable := _hub_unreachable()) is not None:
        raise PxpoInputError(what, f"cannot load hub model {ref!r}: not in the local cache and no network ({unreachable})", fix)
    try:
        return cls.from_pretrained(ref, revision=revision)
    except Exception as exc:  # unknown repository, no access, a broken download: one message naming the id
        raise PxpoInputError(what, f"cannot load hub model {ref!r}: {type(exc).__name__}: {_first_line(exc)}", fix) from None


def _hub_unreachable(timeout: float = 5.0) -> Optional[str]:
    """None if the hub's host takes a TCP connection (or a proxy is configured), else why not (huggingface_hub
    would otherwise retry for about a minute before failing)."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout).close()
    except OSError as exc:
        return f"cannot reach {url.hostname}: {exc}"
    return None


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]


def _field(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)


def clip_pixels(images: torch.Tensor, image_processor: Any) -> torch.Tensor:
    """Images ``(B, 3, H, W)`` in [0, 1] -> the model's ``pixel_values``, as the image processor makes them, differentiably."""
    ip, x = image_processor, images.float()
    size = _field(ip, "size")
    if getattr(ip, "do_resize", True) and size:
        h, w = x.shape[-2:]
        short = _field(size, "shortest_edge")
        if short:
            new = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
        else:
            new = (_field(size, "height"), _field(size, "width"))
        r = getattr(ip, "resample", 3)
        r = getattr(r, "value", r)
        mode = r.lower() if isinstance(r, str) else _MODES.get(int(r), "bicubic")
        if tuple(new) != (h, w):
            x = F.interpolate(x, size=tuple(new), mode=mode, **({"align_corners": False, "antialias": True} if mode != "nearest" else {}))
    crop = _field(ip, "crop_size")
    if getattr(ip, "do_center_crop", False) and crop:
        ch, cw = _field(crop, "height"), _field(crop, "width")
        top, left = max(0, (x.shape[-2] - ch) // 2), max(0, (x.shape[-1] - cw) // 2)
        x = x[..., top : top + ch, left : left + cw]
    if getattr(ip, "do_normalize", True):
        mean = torch.tensor(ip.image_mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(ip.image_std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        x = (x - mean) / std
    return x


def image_embeddings(model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """CLIP image embeddings ``(B, projection_dim)`` (not normalised)."""
    return model.visual_projection(model.vision_model(pixel_values=pixel_values).pooler_output)


def text_embeddings(model: Any, tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
    """CLIP text embeddings ``(B, projection_dim)`` of the prompts (truncated to the model's context)."""
    dev = model.logit_scale.device
    enc = tokenizer(list(prompts), padding=True, truncation=True, max_length=model.config.text_config.max_position_embeddings, return_tensors="pt")
    out = model.text_model(input_ids=enc["input_ids"].to(dev), attention_mask=enc["attention_mask"].to(dev))
    return model.text_projection(out.pooler_output)


def _batched(fn, images: torch.Tensor, prompts: Sequence[str], batch_size: int, model: Any) -> torch.Tensor:
    if model.logit_scale.device != images.device:
        model.to(images.device)
    n = max(1, int(batch_size))
    return torch.cat([fn(images[i : i + n], list(prompts[i : i + n])) for i in range(0, images.shape[0], n)])


@register("clip_score")
def clip_score(model: Any = None, processor: Any = None, revision: Optional[str] = None, batch_size: int = 32) -> LabelFn:
    """CLIP score / PickScore: ``logit_scale.exp() * cos(image, prompt)`` of a transformers CLIPModel, one scalar per image.

    ``model``: a directory written by save_pretrained or a hub id (the processor
    too, unless ``processor`` names another). Differentiable: use it as the
    ``base`` of ``attribution`` for pixel credit.
    """
    clip, ip, tok = load_clip(model, processor, revision)
    if tok is None:
        raise PxpoInputError("reward.kwargs.processor", f"the processor of {processor or model!r} has no tokenizer", "point it to a CLIP processor (image processor and tokenizer)")

    def score(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        unique = list(dict.fromkeys(prompts))
        t = F.normalize(text_embeddings(clip, tok, unique), dim=-1)[[unique.index(p) for p in prompts]]
        i = F.normalize(image_embeddings(clip, clip_pixels(images, ip)), dim=-1)
        return clip.logit_scale.exp() * (i * t).sum(-1)

    def fn(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return _batched(score, images, prompts, batch_size, clip).float()

    return fn


def load_head(path: Any, in_dim: int, what: str = "reward.kwargs.head") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The linear layers ``[(weight (out, in), bias (out,)), ...]`` of an aesthetic head (see the module doc)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if path is None or not Path(str(path)).is_file():
        raise PxpoInputError(what, f"no head file at {path!r}", "give a .safetensors file of linear layers (<layer>.weight, <layer>.bias)")
    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError, ValueError) as exc:
        raise PxpoInputError(what, f"{str(path)!r} is not a safetensors file ({exc})", "save the head with safetensors.torch.save_file") from None
    names = sorted({k.rpartition(".")[0] for k in tensors}, key=lambda s: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)])
    layers, dim = [], in_dim
    for name in names:
        pre = f"{name}." if name else ""
        w, b = tensors.get(pre + "weight"), tensors.get(pre + "bias")
        if w is None or w.dim() != 2 or w.shape[1] != dim or (b is not None and tuple(b.shape) != (w.shape[0],)):
            got = {k: tuple(v.shape) for k, v in tensors.items() if k.startswith(pre)}
            raise PxpoInputError(what, f"layer {name or '(top)'!r} of {str(path)!r} is {got}, expected {pre}weight (out, {dim}) and {pre}bias (out,)",
                                 "write linear layers <layer>.weight (out, in) / <layer>.bias (out,), the first taking the CLIP projection_dim")
        layers.append((w.float(), b.float() if b is not None else torch.zeros(w.shape[0])))
        dim = w.shape[0]
    if not layers or dim != 1:
        raise PxpoInputError(what, f"the head of {str(path)!r} ends in {dim} outputs", "the last layer must have one output (the score)")
    return layers


@register("aesthetic")
def aesthetic(model: Any = None, head: Any = None, processor: Any = None, revision: Optional[str] = None,
              normalize: bool = True, activation: str = "none", batch_size: int = 32) -> LabelFn:
    """Aesthetic score: a CLIP image embedding through a linear / MLP head from safetensors (LAION-style), one scalar per image.

    ``model``: a CLIP directory or hub id; ``head``: the head's .safetensors
    (tensor names in :mod:`pxpo.reward_models`); ``normalize``: L2-normalise the
    embedding first (LAION's); ``activation`` between layers: none, relu, gelu.
    Ignores the prompts; differentiable (``attribution`` gives it pixel credit).
    """
    if activation not in ACTIVATIONS:
        raise PxpoInputError("reward.kwargs.activation", f"unknown activation {activation!r}", f"use one of: {', '.join(ACTIVATIONS)}")
    clip, ip, _ = load_clip(model, processor, revision)
    layers = load_head(head, clip.config.projection_dim)
    act = ACTIVATIONS[activation]

    def score(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        h = image_embeddings(clip, clip_pixels(images, ip))
        if normalize:
            h = F.normalize(h, dim=-1)
        for k, (w, b) in enumerate(layers):
            h = F.linear(h, w.to(h.device), b.to(h.device))
            if act is not None and k < len(layers) - 1:
                h = act(h)
        return h[:, 0]

    def fn(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return _batched(score, images, prompts, batch_size, clip).float()

    return fn
