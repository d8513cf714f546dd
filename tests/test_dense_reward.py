"""The learned dense reward model: trained here on labelled trajectories, scored on held-out samples, used as a labeller."""

import json

import pytest
import torch
import torch.nn.functional as F

from pxpo.cli import main
from pxpo.core import rewards as R
from pxpo.core.rewards.learned import DenseRewardNet
from pxpo.dense_reward import fit, pixel_correlation
from pxpo.errors import PxpoInputError
from pxpo.trajectories import Trajectories, make_meta, quantize_images, save_reward_maps, save_trajectories

H = W = 16


def _images(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, H // 4, W // 4, generator=g)  # smooth images: blobs, not white noise
    return quantize_images(F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False))


def _labelled_dir(tmp_path, n, seed, labeller="brightness_target", **kwargs):
    g = torch.Generator().manual_seed(seed)
    images = _images(n, seed)
    prompts = [f"a handwritten digit {i % 10}" for i in range(n)]
    tr = Trajectories(
        latents=torch.randn(n, 3, 4, 4, 4, generator=g), log_probs=torch.randn(n, 2, 4, 4, 4, generator=g),
        timesteps=torch.tensor([500, 250]), prompt_embeds=torch.randn(n, 4, 8, generator=g), negative_prompt_embeds=torch.zeros(1, 4, 8),
        prompts=prompts, seeds=list(range(n)), images=images,
        meta=make_meta(model_path="m", revision=None, scheduler_config={}, num_steps=2, eta=1.0, guidance_scale=3.0, negative_prompt=""),
    )
    d = tmp_path / f"traj{seed}"
    save_trajectories(tr, d)
    maps, _ = R.make_labeller(labeller, **kwargs)(images, prompts)
    save_reward_maps(d, maps, {})
    return d, images, prompts, maps


def test_trained_model_predicts_held_out_maps_and_labels_by_path(tmp_path):
    d, *_ = _labelled_dir(tmp_path, 160, 0, layout="left_bright")
    code = main(["dense-reward", "train", "--trajectories", str(d), "--out", str(tmp_path / "rm"), "--steps", "300", "--heldout-fraction", "0.25"])
    assert code == 0
    metrics = json.loads((tmp_path / "rm" / "metrics.json").read_text())
    assert metrics["heldout_samples"] == 40 and metrics["heldout_pixel_corr"] > 0.9, metrics
    assert {p.name for p in (tmp_path / "rm").iterdir()} == {"config.json", "model.safetensors", "metrics.json"}

    # as a labeller by path, on fresh images: maps close to the true labeller's
    fresh = _images(20, 99)
    prompts = ["a handwritten digit 3"] * 20
    maps, info = R.make_labeller("dense_model", path=str(tmp_path / "rm"))(fresh, prompts)
    truth, _ = R.make_labeller("brightness_target", layout="left_bright")(fresh, prompts)
    assert maps.shape == (20, H, W) and pixel_correlation(maps, truth) > 0.9
    again = DenseRewardNet.from_pretrained(tmp_path / "rm")(fresh, prompts)
    torch.testing.assert_close(maps, again.detach())


def test_prompt_conditioning_is_learned():
    # the label depends on the prompt only: "bright" prompts want light pixels, "dark" prompts dark ones
    images = _images(96, 1)
    prompts = ["bright" if i % 2 else "dark" for i in range(96)]
    lum = R.luminance(images)
    maps = torch.stack([lum[i] if prompts[i] == "bright" else 1 - lum[i] for i in range(96)])
    model = fit(images[:80], prompts[:80], maps[:80], steps=300, seed=0)
    with torch.no_grad():
        pred = model(images[80:], prompts[80:])
    assert pixel_correlation(pred, maps[80:]) > 0.9


class _Scripted(torch.nn.Module):
    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return images.mean(dim=1) * float(len(prompts))


def test_any_torchscript_module_with_the_signature(tmp_path):
    torch.jit.save(torch.jit.script(_Scripted()), str(tmp_path / "m.pt"))
    images = _images(3, 2)
    maps, _ = R.make_labeller("dense_model", path=str(tmp_path / "m.pt"))(images, ["a", "b", "c"])
    torch.testing.assert_close(maps, images.mean(dim=1) * 3)


def test_bad_paths_are_input_errors(tmp_path, monkeypatch):
    with pytest.raises(PxpoInputError, match="reward.kwargs.path"):
        R.make_labeller("dense_model")
    with pytest.raises(PxpoInputError, match="neither a file, a directory nor a hub id"):
        R.make_labeller("dense_model", path=str(tmp_path / "missing" / "deep" / "x"))
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "config.json").write_text(json.dumps({"class": "os:PathLike"}))
    with pytest.raises(PxpoInputError, match="outside pxpo"):
        R.make_labeller("dense_model", path=str(tmp_path / "foreign"))
    (tmp_path / "junk.pt").write_bytes(b"not a module")
    with pytest.raises(PxpoInputError, match="not a TorchScript module"):
        R.make_labeller("dense_model", path=str(tmp_path / "junk.pt"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PxpoInputError, match="cannot fetch hub model 'someone/reward-model'"):
        R.make_labeller("dense_model", path="someone/reward-model")
