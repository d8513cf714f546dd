"""Compression labellers: a per-block JPEG coding-cost map and DDPO's scalar JPEG rewards."""

import io
import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from .common import _finite_float, _int_in, _scalar_labeller
from .registry import LabelFn, register

# ITU-T T.81 Annex K, tables K.1 (luminance) and K.2 (chrominance).
JPEG_LUMA_TABLE = (
    (16, 11, 10, 16, 24, 40, 51, 61),
    (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77),
    (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101),
    (72, 92, 95, 98, 112, 100, 103, 99),
)
JPEG_CHROMA_TABLE = (
    (17, 18, 24, 47, 99, 99, 99, 99),
    (18, 21, 26, 66, 99, 99, 99, 99),
    (24, 26, 56, 99, 99, 99, 99, 99),
    (47, 66, 99, 99, 99, 99, 99, 99),
    (99, 99, 99, 99, 99, 99, 99, 99),
    (99, 99, 99, 99, 99, 99, 99, 99),
    (99, 99, 99, 99, 99, 99, 99, 99),
    (99, 99, 99, 99, 99, 99, 99, 99),
)


def jpeg_quant_tables(quality: int) -> torch.Tensor:
    """Annex K tables scaled for ``quality`` (1..100) with the IJG formula: ``(2, 8, 8)`` float32 (Y, chroma)."""
    q = int(quality)
    scale = 5000 // q if q < 50 else 200 - 2 * q
    base = torch.tensor([JPEG_LUMA_TABLE, JPEG_CHROMA_TABLE], dtype=torch.int64)
    return torch.clamp(torch.div(base * scale + 50, 100, rounding_mode="floor"), 1, 255).float()


def dct_matrix(n: int = 8, dtype: torch.dtype = torch.float32, device: Any = None) -> torch.Tensor:
    """Orthonormal DCT-II matrix ``D`` (``n x n``): ``coeffs = D @ block @ D.T``."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] = d[0] / math.sqrt(2.0)
    return d.to(device=device, dtype=dtype)


def rgb_to_ycbcr(images: torch.Tensor) -> torch.Tensor:
    """JPEG/JFIF full-range RGB -> YCbCr on the 0..255 scale: ``(B, 3, H, W) in [0, 255] -> (B, 3, H, W)``."""
    r, g, b = images[:, 0], images[:, 1], images[:, 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = 128.0 - 0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 128.0 + 0.5 * r - 0.418688 * g - 0.081312 * b
    return torch.stack([y, cb, cr], dim=1)


def jpeg_block_bits(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """Estimated coded bits per 8x8 block: ``(B, 3, H, W) in [0, 1] -> (B, ceil(H/8), ceil(W/8))``.

    Baseline-JPEG-like pipeline without chroma subsampling: quantise to 8-bit,
    JFIF YCbCr, level shift by 128, edge-replicate padding to a multiple of 8,
    orthonormal 8x8 DCT-II, quantisation with the IJG-scaled Annex K tables
    (luminance table for Y, chrominance table for Cb/Cr).  Each non-zero
    quantised coefficient ``q`` costs ``log2(1 + |q|) + 2`` bits (magnitude
    bits plus a run/size-symbol overhead); zeros are free.  This is an estimate
    of entropy-coded size, not an exact Huffman count.
    """
    b, _, h, w = images.shape
    x = (images.detach().float().clamp(0.0, 1.0) * 255.0).round()
    x = rgb_to_ycbcr(x) - 128.0
    ph, pw = (-h) % 8, (-w) % 8
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    hb, wb = (h + ph) // 8, (w + pw) // 8
    blocks = x.reshape(b, 3, hb, 8, wb, 8).permute(0, 1, 2, 4, 3, 5)  # (B, 3, hb, wb, 8, 8)
    d = dct_matrix(8, torch.float32, x.device)
    coeffs = d @ blocks @ d.T
    tables = jpeg_quant_tables(quality).to(x.device)[[0, 1, 1]]  # (3, 8, 8)
    q = torch.round(coeffs / tables[None, :, None, None])
    bits = torch.where(q != 0, torch.log2(1.0 + q.abs()) + 2.0, torch.zeros_like(q))
    return bits.sum(dim=(1, 4, 5))  # (B, hb, wb)


@register("jpeg_block")
def jpeg_block(quality: int = 95, sign: float = 1.0) -> LabelFn:
    """Per-8x8-block JPEG coding cost map (see :func:`jpeg_block_bits`).

    Every pixel of a block gets ``block_bits / n / 8 / 1024 * sign`` where
    ``n`` is the number of the block's pixels inside the image (64 except for
    the partial blocks of the last row/column when ``H`` or ``W`` is not a
    multiple of 8), so the map's **sum** over an image is the estimated coded
    size in kB (1 kB = 1024 bytes) times ``sign``.  ``sign=-1`` gives the
    compressibility form (see ``jpeg_compressibility``).

    Shapes: ``(B, 3, H, W) -> (B, H, W)``; values have the sign of ``sign``;
    a block costs at most about ``3 * 64 * 12`` bits, so ``|value| <= ~0.28 * |sign|``.
    """
    qual = _int_in(quality, "reward.kwargs.quality", 1, 100)
    s = _finite_float(sign, "reward.kwargs.sign")

    def fn(images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, dict]:
        _, _, h, w = images.shape
        bits = jpeg_block_bits(images, qual)  # (B, hb, wb)
        per_pixel = bits.repeat_interleave(8, dim=1).repeat_interleave(8, dim=2)[:, :h, :w]
        # pixels of each block that lie inside the image (64 for full blocks)
        rows = torch.full((bits.shape[1],), 8.0, device=bits.device)
        cols = torch.full((bits.shape[2],), 8.0, device=bits.device)
        rows[-1] = h - 8 * (bits.shape[1] - 1)
        cols[-1] = w - 8 * (bits.shape[2] - 1)
        n = (rows[:, None] * cols[None, :]).repeat_interleave(8, dim=0).repeat_interleave(8, dim=1)[:h, :w]
        maps = per_pixel / n[None] / 8.0 / 1024.0 * s
        kb = [float(v) for v in bits.double().sum(dim=(1, 2)).cpu() / 8.0 / 1024.0]
        return maps.float(), {"est_kb": kb, "scalar": [k * s for k in kb]}

    return fn


@register("jpeg_compressibility")
def jpeg_compressibility(quality: int = 95) -> LabelFn:
    """``jpeg_block`` with ``sign=-1``: map sum is minus the estimated size in kB. ``(B, 3, H, W) -> (B, H, W)``, range ``<= 0``."""
    return jpeg_block(quality=quality, sign=-1.0)


def jpeg_sizes_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """Actual PIL JPEG file size at ``quality`` in kB (bytes / 1000): ``(B, 3, H, W) -> (B,)`` float64 CPU."""
    arr = (images.detach().float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    arr = arr.permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for a in arr:
        buf = io.BytesIO()
        Image.fromarray(a, mode="RGB").save(buf, format="JPEG", quality=int(quality))
        sizes.append(buf.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float64)


@register("jpeg_size")
def jpeg_size(quality: int = 95) -> LabelFn:
    """Actual JPEG size (PIL, ``quality``) in kB (bytes / 1000) as a constant map.

    Shapes: ``(B, 3, H, W) -> (B, H, W)``; range ``> 0``; ``info["scalar"]``
    holds the per-image sizes.
    """
    qual = _int_in(quality, "reward.kwargs.quality", 1, 100)
    return _scalar_labeller(lambda images, prompts: jpeg_sizes_kb(images, qual))


@register("compressibility")
def compressibility(quality: int = 95) -> LabelFn:
    """Minus the actual JPEG size in kB as a constant map (DDPO's compressibility reward).

    Shapes: ``(B, 3, H, W) -> (B, H, W)``; range ``< 0``; ``info["scalar"]``
    holds the per-image rewards.
    """
    qual = _int_in(quality, "reward.kwargs.quality", 1, 100)
    return _scalar_labeller(lambda images, prompts: -jpeg_sizes_kb(images, qual))
