"""Pixel-wise reward labellers: images and prompts in, one reward per pixel out.

PXPO (arXiv 2404.04356) replaces the single scalar reward of DDPO with a
*reward map*: a labeller scores every pixel of a decoded image, and the policy
gradient of each latent pixel is weighted by the (downsampled) reward of the
image pixels above it.  This package holds the labellers and their registry.

Map conventions
---------------
* A labeller is a :data:`LabelFn`: ``fn(images, prompts) -> (maps, info)``.
* ``images`` is a float tensor of shape ``(B, 3, H, W)`` with RGB values in
  ``[0, 1]``; ``prompts`` is a sequence of ``B`` strings (the labellers shipped
  here ignore them; they exist for prompt-conditioned labellers).
* ``maps`` is a float32 tensor of shape ``(B, H, W)``, finite, on the images'
  device.  Higher is better.  ``maps[b, y, x]`` is the reward of pixel
  ``(y, x)`` of image ``b``.
* ``info`` is a dict of plain python floats or lists of floats (one per image),
  safe to log.  Labellers derived from a scalar reward put it in
  ``info["scalar"]``.
* A scalar reward ``r`` becomes a map either as a constant map (every pixel
  gets ``r``, see :func:`constant_maps`) or, with credit assignment, through
  occlusion (:func:`occlusion_map`), whose pixel mean is still exactly ``r``.
* Labellers are built from the registry: ``make_labeller(name, **kwargs)``,
  where ``kwargs`` come from the user's config (``reward.kwargs``).  Bad names
  and arguments raise :class:`pxpo.errors.PxpoInputError`.  ``name`` may also
  be an installed plugin (entry-point group ``pxpo.labellers``) or a
  ``package.module:factory`` reference (:mod:`.plugins`); a labeller may
  return scalars ``(B,)``, which become constant maps.

Region names (``"all"``, ``"left"``, ``"right"``, ``"top"``, ``"bottom"``,
``"center"``) are defined on pixel centres: ``"left"`` is the columns whose
centre lies left of ``W / 2``; ``"center"`` is the central rectangle of half
the height and half the width.

Families, one module each: :mod:`.formulas` (constant, brightness layouts),
:mod:`.masks` (colour in a region, ink masks), :mod:`.compression` (JPEG),
:mod:`.similarity` (SSIM), :mod:`.adapters` (occlusion), :mod:`.attribution` (gradient
attribution of a differentiable scalar reward), :mod:`.human`
(painted maps from people or any tool) and :mod:`.learned` (a trained dense
reward model).  Importing the package registers them all.  :mod:`.combine`
weights several labellers into one map per sample (optionally normalised per
prompt group first).
"""

from . import adapters, attribution, compression, formulas, human, learned, masks, plugins, similarity  # noqa: F401  (register)
from .adapters import _as_scalar_fn, _occlusion, base_scalar_fn, occlusion, occlusion_map
from .attribution import attribution_adapter, attribution_map, pixel_attribution, window_sum
from .common import (
    REGIONS,
    _as_grid,
    _finite_float,
    _int_in,
    _MaskSpec,
    _per_image_mean,
    _resize_grid,
    _rgb,
    _scalar_labeller,
    _unit_float,
    constant_maps,
    luminance,
    region_mask,
)
from .combine import Component, combine_maps, combined_labeller, component_means, group_normalize
from .compression import (
    JPEG_CHROMA_TABLE,
    JPEG_LUMA_TABLE,
    compressibility,
    dct_matrix,
    jpeg_block,
    jpeg_block_bits,
    jpeg_compressibility,
    jpeg_quant_tables,
    jpeg_size,
    jpeg_sizes_kb,
    rgb_to_ycbcr,
)
from .formulas import brightness_target, constant
from .masks import color_target, mask_region
from .registry import (
    REGISTRY,
    LabelFn,
    ScalarFn,
    _check_images,
    available,
    check_maps,
    lookup,
    make_labeller,
    name_problem,
    origin,
    register,
)
from .similarity import _load_reference, gaussian_window, ssim, ssim_map
