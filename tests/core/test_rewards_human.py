"""painted_maps (maps painted in any tool) and the brush-stroke -> map rule of pxpo.core.rewards.human."""

import numpy as np
import pytest
import torch
from PIL import Image

from pxpo.core import rewards as R
from pxpo.core.rewards.human import average_annotations, brush_map
from pxpo.errors import PxpoInputError

H, W = 6, 8


def _images(n):
    return torch.rand(n, 3, H, W, generator=torch.Generator().manual_seed(0))


def test_painted_png_and_npy_keyed_by_index(tmp_path):
    grey = (np.arange(H * W).reshape(H, W) * 5).astype(np.uint8)
    Image.fromarray(grey, mode="L").save(tmp_path / "000000.png")
    values = np.linspace(-1, 1, H * W).reshape(H, W)
    np.save(tmp_path / "1.npy", values)
    deep = (np.arange(H * W, dtype=np.uint16).reshape(H, W) * 1000)
    Image.fromarray(deep).save(tmp_path / "2.png")  # 16-bit grey
    (tmp_path / "notes.txt").write_text("ignored")
    fn = R.make_labeller("painted_maps", path=str(tmp_path), low=-1.0, high=1.0)
    maps, info = fn(_images(3), ["a", "b", "c"])
    np.testing.assert_allclose(maps[0].numpy(), -1 + 2 * grey.astype(np.float64) / 255.0, rtol=0, atol=1e-6)
    np.testing.assert_allclose(maps[1].numpy(), values, rtol=0, atol=1e-6)
    np.testing.assert_allclose(maps[2].numpy(), -1 + 2 * deep.astype(np.float64) / 65535.0, rtol=0, atol=1e-6)
    assert len(info["mean"]) == 3
    shifted = R.make_labeller("painted_maps", path=str(tmp_path), low=-1.0, high=1.0, offset=1)
    np.testing.assert_allclose(shifted(_images(1), ["b"])[0][0].numpy(), values, atol=1e-6)


def test_painted_errors_name_the_file(tmp_path):
    np.save(tmp_path / "0.npy", np.zeros((H, W)))
    fn = R.make_labeller("painted_maps", path=str(tmp_path))
    with pytest.raises(PxpoInputError, match=r"no map for 2 of 3 samples \(indices 1, 2\)"):
        fn(_images(3), ["a"] * 3)
    np.save(tmp_path / "1.npy", np.full((H, W), 1.5))
    with pytest.raises(PxpoInputError, match=r"1\.npy.*leave the range \[0\.0, 1\.0\]"):
        fn(_images(2), ["a"] * 2)
    np.save(tmp_path / "1.npy", np.zeros((H + 1, W)))
    with pytest.raises(PxpoInputError, match=r"1\.npy.*map of size \(7, 8\) for an image of \(6, 8\)"):
        fn(_images(2), ["a"] * 2)
    Image.fromarray(np.zeros((H, W), np.uint8)).save(tmp_path / "000001.png")
    with pytest.raises(PxpoInputError, match="a second map for sample 1"):
        fn(_images(2), ["a"] * 2)
    (tmp_path / "1.npy").unlink()
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb).save(tmp_path / "000001.png")
    with pytest.raises(PxpoInputError, match="colour PNG"):
        fn(_images(2), ["a"] * 2)
    with pytest.raises(PxpoInputError, match="reward.kwargs.path"):
        R.make_labeller("painted_maps", path=str(tmp_path / "nope"))
    with pytest.raises(PxpoInputError, match="reward.kwargs.path"):
        R.make_labeller("painted_maps")


def test_brush_map_neutral_order_and_average():
    good = np.zeros((H, W))
    good[:, :4] = 1
    bad = np.zeros((H, W))
    bad[2:4, 2:6] = 1.0
    m = brush_map([("good", good), ("bad", bad)], {"good": 1.0, "bad": -2.0}, 0.5, H, W)
    expected = np.full((H, W), 0.5)
    expected[:, :4] = 1.0
    expected[2:4, 2:6] = -2.0  # the later stroke paints over the earlier one
    np.testing.assert_array_equal(m.numpy(), expected)
    other = brush_map([], {"good": 1.0}, 0.5, H, W)
    np.testing.assert_array_equal(average_annotations([m, other]).numpy(), (expected + 0.5) / 2)
    with pytest.raises(PxpoInputError, match="label 'meh'"):
        brush_map([("meh", good)], {"good": 1.0}, 0.0, H, W)
    with pytest.raises(PxpoInputError, match="brush mask of shape"):
        brush_map([("good", good[:3])], {"good": 1.0}, 0.0, H, W)


def test_rewards_package_keeps_the_old_import_surface():
    from pxpo.core.rewards import REGISTRY, make_labeller

    assert {"painted_maps", "dense_model", "brightness_target", "occlusion", "ssim", "jpeg_block"} <= set(REGISTRY)
    assert make_labeller is R.make_labeller
