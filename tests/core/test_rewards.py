"""Tests for pxpo.core.rewards: pixel-wise reward labellers and their registry."""

import numpy as np
import pytest
import torch
from PIL import Image

from pxpo.config.rewards import known_labellers
from pxpo.core import rewards as R
from pxpo.errors import PxpoInputError

# labellers that need arguments to be built
NEEDS_KWARGS = {"ssim": {"reference": np.linspace(0.0, 1.0, 64).reshape(8, 8)}}
SHAPES = [(2, 3, 16, 16), (1, 3, 24, 20)]


def _rand(shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def _spearman(a, b):
    ra = np.argsort(np.argsort(np.asarray(a)))
    rb = np.argsort(np.argsort(np.asarray(b)))
    return float(np.corrcoef(ra, rb)[0, 1])


# ----- registry and checks ---------------------------------------------------


def test_available_lists_all_shipped_labellers():
    expected = {
        "brightness_target", "color_target", "mask_region", "jpeg_block", "jpeg_compressibility",
        "ssim", "jpeg_size", "compressibility", "occlusion", "constant", "ink_colour",
    }
    assert expected <= set(R.available())
    assert R.available() == sorted(R.REGISTRY)


# Labellers reading files (a folder of painted maps, a trained model) or asking a server (http) have their
# own shape / dtype / info tests: tests/core/test_rewards_human.py, tests/test_dense_reward.py and
# tests/test_rewards_http.py.
NEEDS_FILES = {"painted_maps", "dense_model", "http"}
NEEDS_FILES |= {"clip_score", "aesthetic"}  # CLIP models from files: tests/test_reward_models.py


# Every registered labeller, the library's (digit_fidelity) included: the list must not depend on which
# test module imported pxpo.labellers first. Prompts name a digit, as digit_fidelity requires.
@pytest.mark.parametrize("name", sorted(set(known_labellers()) - NEEDS_FILES))
@pytest.mark.parametrize("shape", SHAPES)
def test_every_labeller_shape_dtype_finite(name, shape):
    fn = R.make_labeller(name, **NEEDS_KWARGS.get(name, {}))
    images = _rand(shape, seed=shape[2])
    maps, info = fn(images, ["a handwritten digit 3"] * shape[0])
    assert maps.shape == (shape[0], shape[2], shape[3])
    assert maps.dtype == torch.float32
    assert torch.isfinite(maps).all()
    assert isinstance(info, dict)
    for v in info.values():
        assert isinstance(v, (float, list))
        if isinstance(v, list):
            assert len(v) == shape[0] and all(isinstance(e, float) for e in v)


def test_make_labeller_unknown_name_lists_known():
    with pytest.raises(PxpoInputError) as e:
        R.make_labeller("no_such_reward")
    msg = str(e.value)
    assert "no_such_reward" in msg and "brightness_target" in msg
    assert e.value.what == "reward.name"


def test_make_labeller_bad_kwarg_names_it():
    with pytest.raises(PxpoInputError) as e:
        R.make_labeller("brightness_target", colour="red")
    assert "colour" in str(e.value)
    assert e.value.what == "reward.kwargs.colour"


def test_bad_kwarg_values_raise_input_errors():
    with pytest.raises(PxpoInputError, match="layout"):
        R.make_labeller("brightness_target", layout="diagonal_bright")
    with pytest.raises(PxpoInputError, match="reference is required"):
        R.make_labeller("ssim")
    with pytest.raises(PxpoInputError, match="region"):
        R.make_labeller("color_target", region="middle")
    with pytest.raises(PxpoInputError, match="quality"):
        R.make_labeller("jpeg_block", quality=0)


def test_check_maps_rejects_wrong_shape_and_nan():
    R.check_maps(torch.zeros(2, 4, 5), (2, 3, 4, 5))
    with pytest.raises(PxpoInputError) as e:
        R.check_maps(torch.zeros(2, 5, 4), (2, 3, 4, 5))
    assert "(2, 4, 5)" in str(e.value) and "(2, 5, 4)" in str(e.value)
    assert "labeller must return (B, H, W) finite maps" in str(e.value)
    with pytest.raises(PxpoInputError):
        R.check_maps(torch.zeros(2, 1, 4, 5), (2, 3, 4, 5))
    bad = torch.zeros(2, 4, 5)
    bad[1, 2, 3] = float("nan")
    with pytest.raises(PxpoInputError, match="finite maps"):
        R.check_maps(bad, (2, 3, 4, 5))
    bad[1, 2, 3] = float("inf")
    with pytest.raises(PxpoInputError):
        R.check_maps(bad, (2, 3, 4, 5))


def test_luminance_bt601():
    img = torch.zeros(1, 3, 2, 2)
    img[0, 0] = 1.0
    assert torch.allclose(R.luminance(img), torch.full((1, 2, 2), 0.299))
    assert torch.allclose(R.luminance(torch.ones(2, 3, 3, 4)), torch.ones(2, 3, 4))


# ----- brightness, colour, mask ----------------------------------------------


def test_brightness_left_bright_prefers_bright_left():
    img = torch.zeros(1, 3, 16, 16)
    img[..., :8] = 0.8
    fn = R.make_labeller("brightness_target", layout="left_bright")
    good, _ = fn(img, [""])
    bad, _ = fn(img.flip(-1), [""])
    assert good.mean() > bad.mean()
    assert good.min() >= 0.0 and good.max() <= 1.0


@pytest.mark.parametrize("layout", ["left_bright", "right_bright", "top_bright", "bottom_bright", "center_bright", "all_bright", "all_dark"])
def test_brightness_perfect_target_is_one(layout):
    h, w = 16, 12
    region = {"left_bright": "left", "right_bright": "right", "top_bright": "top", "bottom_bright": "bottom",
              "center_bright": "center", "all_bright": "all"}.get(layout)
    target = R.region_mask(region, h, w).float() if region else torch.zeros(h, w)
    img = target.expand(1, 3, h, w).clone()
    maps, _ = R.make_labeller("brightness_target", layout=layout)(img, [""])
    assert torch.allclose(maps, torch.ones_like(maps), atol=1e-6)


def test_brightness_grid_layout_resized():
    grid = [[1.0, 0.0], [0.0, 1.0]]
    fn = R.make_labeller("brightness_target", layout=grid)
    img = torch.zeros(1, 3, 8, 8)
    img[..., :4, :4] = 1.0
    img[..., 4:, 4:] = 1.0
    maps, _ = fn(img, [""])
    assert maps[0, 0, 0] == pytest.approx(1.0) and maps[0, 7, 7] == pytest.approx(1.0)
    assert maps.mean() > fn(1.0 - img, [""])[0].mean()
    with pytest.raises(PxpoInputError):
        R.make_labeller("brightness_target", layout=[[2.0, 0.0]])


def test_color_target_max_on_exact_colour():
    color = (0.2, 0.6, 0.9)
    fn = R.make_labeller("color_target", color=color, region="all")
    exact = torch.tensor(color).view(1, 3, 1, 1).expand(1, 3, 8, 8)
    maps, _ = fn(exact, [""])
    assert torch.allclose(maps, torch.ones_like(maps), atol=1e-6)
    other, _ = fn(_rand((4, 3, 8, 8)), [""] * 4)
    assert (other < 1.0).all()


def test_color_target_region_and_background():
    red = torch.zeros(1, 3, 8, 8)
    red[:, 0] = 1.0
    maps, _ = R.make_labeller("color_target", color=(1, 0, 0), region="left")(red, [""])
    assert torch.all(maps[..., :4] == 1.0) and torch.all(maps[..., 4:] == 0.0)
    maps, _ = R.make_labeller("color_target", color=(1, 0, 0), region="left", background=(0, 0, 1))(red, [""])
    assert torch.allclose(maps[..., 4:], torch.full_like(maps[..., 4:], 1 / 3))


def test_mask_region_sign():
    fn = R.make_labeller("mask_region", mask="center", inside=1.0, outside=-1.0)
    inside_ink = torch.zeros(1, 3, 16, 16)
    inside_ink[..., 4:12, 4:12] = 1.0
    outside_ink = 1.0 - inside_ink
    m_in, _ = fn(inside_ink, [""])
    m_out, _ = fn(outside_ink, [""])
    assert m_in.sum() > 0 and m_out.sum() < 0
    assert m_in.min() >= 0.0 and m_out.max() <= 0.0
    grid = np.zeros((4, 4))
    grid[0, 0] = 1.0
    m_grid, _ = R.make_labeller("mask_region", mask=grid)(torch.ones(1, 3, 8, 8), [""])
    assert torch.all(m_grid[0, :2, :2] == 1.0) and m_grid.sum() == 4 - 60


# ----- JPEG ------------------------------------------------------------------


def _varied_images(n=20, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    smooth = torch.stack([xx, yy, (xx + yy) / 2])
    out = []
    for i in range(n):
        a = i / (n - 1)
        out.append((1 - a) * smooth + a * torch.rand(3, size, size, generator=g))
    return torch.stack(out)


def test_jpeg_block_sum_tracks_pil_size():
    images = _varied_images()
    maps, info = R.make_labeller("jpeg_block", quality=95)(images, [""] * len(images))
    est = maps.double().sum(dim=(1, 2))
    assert torch.allclose(est, torch.tensor(info["est_kb"], dtype=torch.float64), rtol=1e-5)
    actual = R.jpeg_sizes_kb(images, 95)
    assert _spearman(est.numpy(), actual.numpy()) > 0.9
    # same order of magnitude as the real file in kB (the real one adds headers)
    assert (est > 0).all() and (est < 2 * actual).all()


def test_jpeg_block_flat_cheaper_than_noise_and_sign():
    flat = torch.full((1, 3, 16, 16), 0.4)
    noise = _rand((1, 3, 16, 16))
    fn = R.make_labeller("jpeg_block")
    assert fn(flat, [""])[0].sum() < fn(noise, [""])[0].sum()
    comp = R.make_labeller("jpeg_compressibility")
    assert torch.allclose(comp(noise, [""])[0], -fn(noise, [""])[0])


def test_jpeg_block_partial_blocks_sum_is_estimate():
    images = _rand((2, 3, 13, 19))
    maps, info = R.make_labeller("jpeg_block")(images, ["", ""])
    assert torch.allclose(maps.double().sum(dim=(1, 2)), torch.tensor(info["est_kb"], dtype=torch.float64), rtol=1e-5)


def test_jpeg_quant_tables_ijg():
    t50 = R.jpeg_quant_tables(50)
    assert t50[0, 0, 0] == 16 and t50[1, 7, 7] == 99
    t95 = R.jpeg_quant_tables(95)
    assert t95[0, 0, 0] == 2 and t95.min() >= 1
    d = R.dct_matrix(8)
    assert torch.allclose(d @ d.T, torch.eye(8), atol=1e-6)


def test_compressibility_is_minus_jpeg_size():
    images = _rand((2, 3, 16, 16))
    size, info_s = R.make_labeller("jpeg_size")(images, ["", ""])
    comp, info_c = R.make_labeller("compressibility")(images, ["", ""])
    assert torch.equal(comp, -size)
    assert info_c["scalar"] == [-v for v in info_s["scalar"]]
    assert torch.allclose(size[:, 0, 0].double(), R.jpeg_sizes_kb(images, 95), atol=1e-6)
    assert torch.all(size == size[:, :1, :1])  # constant per image


# ----- SSIM ------------------------------------------------------------------


def test_ssim_self_is_one_and_noise_lower():
    ref = _rand((3, 16, 16), seed=3)
    fn = R.make_labeller("ssim", reference=ref)
    maps, _ = fn(ref[None], [""])
    assert torch.allclose(maps, torch.ones_like(maps), atol=1e-5)
    noisy = (ref + 0.2 * _rand((3, 16, 16), seed=4) - 0.1).clamp(0, 1)
    m_noisy, _ = fn(noisy[None], [""])
    assert m_noisy.mean() < 0.99
    assert (m_noisy <= 1.0 + 1e-5).all()


def test_ssim_reference_from_file_and_list(tmp_path):
    ref = (_rand((12, 10, 3), seed=5) * 255).round().to(torch.uint8).numpy()
    path = tmp_path / "ref.png"
    Image.fromarray(ref).save(path)
    img = torch.from_numpy(ref).float().permute(2, 0, 1)[None] / 255.0
    for reference in (str(path), path, img[0].tolist()):
        maps, _ = R.make_labeller("ssim", reference=reference)(img, [""])
        assert torch.allclose(maps, torch.ones_like(maps), atol=1e-5)
    # resized when the sizes differ
    maps, _ = R.make_labeller("ssim", reference=str(path))(_rand((2, 3, 16, 16)), ["", ""])
    assert maps.shape == (2, 16, 16)
    with pytest.raises(PxpoInputError):
        R.make_labeller("ssim", reference=str(tmp_path / "missing.png"))


# ----- occlusion -------------------------------------------------------------


def test_occlusion_mean_equals_base_scalar():
    images = _rand((2, 3, 16, 16), seed=7)
    maps, info = R.make_labeller("occlusion", base="jpeg_size", patch=4)(images, ["", ""])
    base = R.jpeg_sizes_kb(images, 95)
    assert torch.allclose(maps.double().mean(dim=(1, 2)), base, atol=1e-6)
    assert info["scalar"] == pytest.approx(base.tolist())


def test_occlusion_unequal_patches_keep_mean():
    images = _rand((1, 3, 10, 7), seed=8)

    def scalar_fn(x, prompts):
        return (x[:, 0] * torch.linspace(0, 1, x.shape[-1])).mean(dim=(1, 2)) + x[:, 1, :3].mean(dim=(1, 2))

    maps = R.occlusion_map(scalar_fn, images, [""], patch=4, fill=0.5)
    assert maps.shape == (1, 10, 7)
    assert maps.double().mean().item() == pytest.approx(scalar_fn(images, [""]).item(), abs=1e-6)
    chunked = R.occlusion_map(scalar_fn, images, [""], patch=4, fill=0.5, max_batch=3)
    assert torch.allclose(chunked, maps)


def test_occlusion_credits_the_patch_the_reward_looks_at():
    images = 0.5 + 0.5 * _rand((2, 3, 16, 16), seed=9)  # brighter than the fill
    calls = []

    def top_left_mean(x, prompts):
        calls.append(len(x))
        return x[:, :, :4, :4].mean(dim=(1, 2, 3))

    maps, info = R.make_labeller("occlusion", base=top_left_mean, patch=4)(images, ["a", "b"])
    assert calls == [2, 2 * 16]  # full images, then all masked variants in one call
    for b in range(2):
        assert maps[b, :4, :4].min() > maps[b, 4:, :].max()
        assert maps[b, :4, :4].min() > maps[b, :4, 4:].max()
        assert maps[b].double().mean().item() == pytest.approx(info["scalar"][b], abs=1e-6)


def test_occlusion_accepts_labeller_name_with_kwargs():
    fn = R.make_labeller("occlusion", base="constant", base_kwargs={"value": 2.5}, patch=8)
    maps, _ = fn(_rand((1, 3, 16, 16)), [""])
    assert torch.allclose(maps, torch.full_like(maps, 2.5))
    with pytest.raises(PxpoInputError):
        R.make_labeller("occlusion", base="nope")


def test_constant_maps_helper():
    m = R.constant_maps(torch.tensor([1.0, -2.0]), 3, 4)
    assert m.shape == (2, 3, 4) and m.dtype == torch.float32
    assert torch.all(m[1] == -2.0)


def test_labeller_checks_inputs():
    fn = R.make_labeller("constant")
    with pytest.raises(PxpoInputError):
        fn(torch.zeros(2, 1, 4, 4), ["", ""])
    with pytest.raises(PxpoInputError, match="prompts"):
        fn(torch.zeros(2, 3, 4, 4), [""])


# ----- ink_colour: the embedded default's task ---------------------------------------------


def _ink(rgb, strength=1.0):
    """A 1 x 3 x 2 x 2 image: black, with one pixel of ink ``strength * rgb``."""
    img = torch.zeros(1, 3, 2, 2)
    img[0, :, 0, 0] = strength * torch.tensor(rgb, dtype=torch.float32)
    return img


@pytest.mark.parametrize("strength", [1.0, 0.5, 0.25, 0.1])
def test_ink_colour_scores_the_colour_not_the_strength(strength):
    fn = R.make_labeller("ink_colour", colour="red")  # floor 0.25
    maps, _ = fn(_ink([1.0, 0.0, 0.0], strength), [""])
    assert torch.allclose(maps, torch.ones(1, 2, 2))  # red ink at any strength, and the black background, score 1
    white, _ = fn(_ink([1.0, 1.0, 1.0], strength), [""])
    # white ink misses red by its full strength in green and blue: 0 wherever it is ink (strength >= floor),
    # so dimming a wrong-coloured stroke does not pay; below the floor it fades towards black's 1
    assert white[0, 0, 0].item() == pytest.approx(0.0 if strength >= 0.25 else 1 - strength / 0.25)
    assert torch.allclose(white[0].flatten()[1:], torch.ones(3))


def test_ink_colour_floor_sets_where_hue_counts():
    dim_white = _ink([1.0, 1.0, 1.0], 0.2)
    assert R.make_labeller("ink_colour", floor=0.1)(dim_white, [""])[0][0, 0, 0].item() == pytest.approx(0.0)
    assert R.make_labeller("ink_colour", floor=1.0)(dim_white, [""])[0][0, 0, 0].item() == pytest.approx(0.8)
    with pytest.raises(PxpoInputError, match="reward.kwargs.floor"):
        R.make_labeller("ink_colour", floor=0)


def test_ink_colour_orders_hues_by_distance_to_the_target():
    fn = R.make_labeller("ink_colour", colour=[1.0, 0.0, 0.0])
    score = {name: fn(_ink(rgb), [""])[0][0, 0, 0].item()
             for name, rgb in {"red": [1, 0, 0], "orange": [1, 0.5, 0], "yellow": [1, 1, 0], "blue": [0, 0, 1]}.items()}
    assert score["red"] == 1.0 and score["orange"] == pytest.approx(0.5) and score["yellow"] == 0.0 and score["blue"] == 0.0


def test_ink_colour_target_is_scaled_to_full_strength():
    dim, full = R.make_labeller("ink_colour", colour=[0.5, 0.25, 0.0]), R.make_labeller("ink_colour", colour=[1.0, 0.5, 0.0])
    img = _rand((2, 3, 5, 5), seed=3)
    assert torch.allclose(dim(img, [""] * 2)[0], full(img, [""] * 2)[0])


@pytest.mark.parametrize("bad", ["crimson", [0, 0, 0], [1, 2, 0], [1, 0]])
def test_ink_colour_bad_colour_names_the_field(bad):
    with pytest.raises(PxpoInputError, match="reward.kwargs.colour"):
        R.make_labeller("ink_colour", colour=bad)
