"""A learned dense reward model: (image, prompt) -> (H, W) reward map, usable as a labeller by path.

:class:`DenseRewardNet` is small (a few thousand parameters) so a few hundred
labelled images (people's maps from Label Studio, or any labeller's) train it
on a CPU in seconds; ``pxpo dense-reward train`` does (pxpo.dense_reward).
It is fully convolutional with two coordinate channels (rewards that depend on
where a pixel is, e.g. "the left half bright", are learnable) and conditions
on the prompt through a hashed bag of words (FiLM: a scale and shift per
channel), so it needs no tokenizer.

Files, ``save_pretrained``-style: ``<dir>/config.json`` (the architecture,
the class and the label statistics) and ``<dir>/model.safetensors``.

``reward.name: dense_model`` with ``reward.kwargs.path``:

* a directory written by ``save_pretrained`` (its ``config.json`` names the
  class, ``"module:Class"``; the class must be a ``torch.nn.Module`` with a
  ``from_pretrained(dir)`` classmethod; only classes under ``pxpo.`` unless
  ``trust_code=True``);
* a TorchScript file (``.pt`` / ``.ts``) of any module with the signature
  ``forward(images: Tensor (B, 3, H, W), prompts: List[str]) -> Tensor (B, H, W)``;
* a Hugging Face hub id (``owner/name``), fetched with ``huggingface_hub`` and
  then read as a directory.
"""

import importlib
import json
import re
import zlib
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from pxpo.errors import PxpoInputError

from .common import _per_image_mean
from .registry import LabelFn, register

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_WORD = re.compile(r"[a-z0-9]+")


def prompt_tokens(prompts: Sequence[str], vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hashed bag of words for ``nn.EmbeddingBag``: lower-cased words -> ``crc32 % (vocab - 1) + 1``; 0 = empty prompt."""
    ids: list[int] = []
    offsets: list[int] = []
    for p in prompts:
        offsets.append(len(ids))
        words = _WORD.findall(str(p).lower()) or [""]
        ids += [zlib.crc32(w.encode()) % (vocab - 1) + 1 if w else 0 for w in words]
    return torch.tensor(ids, dtype=torch.long), torch.tensor(offsets, dtype=torch.long)


class DenseRewardNet(nn.Module):
    """``forward(images (B, 3, H, W) in [0, 1], prompts) -> maps (B, H, W)`` in label units."""

    def __init__(self, channels: int = 32, vocab: int = 1024, embed_dim: int = 32, layers: int = 3,
                 label_mean: float = 0.0, label_std: float = 1.0):
        super().__init__()
        self.config = {"channels": channels, "vocab": vocab, "embed_dim": embed_dim, "layers": layers,
                       "label_mean": float(label_mean), "label_std": float(label_std)}
        self.embed = nn.EmbeddingBag(vocab, embed_dim, mode="mean")
        self.film = nn.Linear(embed_dim, 2 * channels)
        self.inp = nn.Conv2d(5, channels, 1)
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=d, dilation=d) for d in (1, 2, 4, 1, 2, 4)[:layers])
        self.mix = nn.Conv2d(channels, channels, 1)
        self.out = nn.Conv2d(channels, 1, 1)
        self.register_buffer("stats", torch.tensor([float(label_mean), float(label_std)]), persistent=True)

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        b, _, h, w = images.shape
        ys = torch.linspace(-1.0, 1.0, h, device=images.device, dtype=images.dtype)
        xs = torch.linspace(-1.0, 1.0, w, device=images.device, dtype=images.dtype)
        coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"))[None].expand(b, 2, h, w)
        x = F.gelu(self.inp(torch.cat([images, coords], dim=1)))
        ids, offsets = prompt_tokens(prompts, self.config["vocab"])
        scale, shift = self.film(self.embed(ids.to(images.device), offsets.to(images.device))).chunk(2, dim=1)
        x = x * (1.0 + scale[:, :, None, None]) + shift[:, :, None, None]
        for conv in self.convs:
            x = x + F.gelu(conv(x))
        x = self.out(F.gelu(self.mix(x)))[:, 0]
        return x * self.stats[1] + self.stats[0]

    # --- files --------------------------------------------------------------------------------

    def save_pretrained(self, directory: Any) -> None:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (which must exist)."""
        from safetensors.torch import save_file

        d = Path(directory)
        cls = type(self)
        (d / CONFIG_NAME).write_text(json.dumps({"class": f"{cls.__module__}:{cls.__qualname__}", **self.config}, indent=2) + "\n")
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(d / WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, directory: Any) -> "DenseRewardNet":
        from safetensors.torch import load_file

        d = Path(directory)
        config = _read_config(d)
        kwargs = {k: config[k] for k in ("channels", "vocab", "embed_dim", "layers", "label_mean", "label_std") if k in config}
        try:
            model = cls(**kwargs)
            model.load_state_dict(load_file(str(d / WEIGHTS_NAME)))
        except (OSError, RuntimeError, TypeError, ValueError) as exc:
            raise PxpoInputError(str(d / WEIGHTS_NAME), f"cannot load the weights ({exc})", "point to a directory written by save_pretrained") from None
        return model.eval()


def _read_config(d: Path) -> dict:
    f = d / CONFIG_NAME
    try:
        config = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PxpoInputError(str(f), f"unreadable ({exc})", "point reward.kwargs.path to a directory written by save_pretrained") from None
    if not isinstance(config, dict):
        raise PxpoInputError(str(f), "not a JSON object", "write it with save_pretrained")
    return config


def load_reward_model(path: Any, trust_code: bool = False, revision: Optional[str] = None) -> nn.Module:
    """A reward model from a save_pretrained directory, a TorchScript file or a hub id (see the module doc)."""
    what = "reward.kwargs.path"
    p = Path(str(path))
    if p.is_file():
        try:
            return torch.jit.load(str(p), map_location="cpu").eval()
        except (RuntimeError, ValueError) as exc:
            raise PxpoInputError(str(p), f"not a TorchScript module ({exc})", "save it with torch.jit.save(torch.jit.script(model), path)") from None
    if not p.is_dir():
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)):
            raise PxpoInputError(what, f"{str(path)!r} is neither a file, a directory nor a hub id", "give a save_pretrained directory, a TorchScript file or owner/name")
        try:
            from huggingface_hub import snapshot_download

            p = Path(snapshot_download(str(path), revision=revision))
        except Exception as exc:  # offline, unknown repo, no access: one clear message
            raise PxpoInputError(what, f"cannot fetch hub model {str(path)!r} ({type(exc).__name__}: {exc})", "download it first and give the local directory") from None
    config = _read_config(p)
    name = config.get("class", "")
    module, _, qual = str(name).partition(":")
    if not module or not qual:
        raise PxpoInputError(str(p / CONFIG_NAME), f"class {name!r} is not 'module:Class'", "write the model with save_pretrained")
    if not trust_code and module.split(".")[0] != "pxpo":
        raise PxpoInputError(str(p / CONFIG_NAME), f"class {name!r} is outside pxpo", "set reward.kwargs.trust_code=true if you trust its code")
    try:
        cls = importlib.import_module(module)
        for part in qual.split("."):
            cls = getattr(cls, part)
    except (ImportError, AttributeError) as exc:
        raise PxpoInputError(str(p / CONFIG_NAME), f"class {name!r} not importable ({exc})", "install the package that defines it") from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module) and hasattr(cls, "from_pretrained")):
        raise PxpoInputError(str(p / CONFIG_NAME), f"{name!r} is not a torch module with from_pretrained", "use a DenseRewardNet or a TorchScript file")
    return cls.from_pretrained(p).eval()


@register("dense_model")
def dense_model(path: Any = None, trust_code: bool = False, revision: Optional[str] = None, batch_size: int = 64) -> LabelFn:
    """A trained reward model's maps: ``model(images, prompts) -> (B, H, W)`` (see :func:`load_reward_model`).

    Shapes: ``(B, 3, H, W) -> (B, H, W)``; range: the model's (a DenseRewardNet is trained on label units).
    """
    if path is None:
        raise PxpoInputError("reward.kwargs.path", "the dense_model labeller needs a model", "set reward.kwargs.path (pxpo dense-reward train --out DIR)")
    model = load_reward_model(path, trust_code=bool(trust_code), revision=revision)

    def fn(images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, dict]:
        dev = next(iter(model.parameters()), torch.empty(0)).device
        outs = []
        with torch.no_grad():
            for i in range(0, images.shape[0], max(1, int(batch_size))):
                outs.append(model(images[i : i + batch_size].to(dev).float(), list(prompts[i : i + batch_size])).float())
        maps = torch.cat(outs).to(images.device)
        return maps, {"mean": _per_image_mean(maps)}

    return fn
