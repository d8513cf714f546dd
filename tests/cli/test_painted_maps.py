"""`pxpo label` with reward.name=painted_maps: maps from a folder, missing samples -> exit 2 naming them."""

import numpy as np
import torch

from pxpo.cli import main
from pxpo.trajectories import Trajectories, load_reward_maps, make_meta, quantize_images, save_trajectories


def _traj(d, n=3, size=8):
    g = torch.Generator().manual_seed(0)
    save_trajectories(Trajectories(
        latents=torch.randn(n, 3, 4, 2, 2, generator=g), log_probs=torch.randn(n, 2, 4, 2, 2, generator=g),
        timesteps=torch.tensor([500, 250]), prompt_embeds=torch.randn(n, 4, 8, generator=g), negative_prompt_embeds=torch.zeros(1, 4, 8),
        prompts=[f"p{i}" for i in range(n)], seeds=list(range(n)), images=quantize_images(torch.rand(n, 3, size, size, generator=g)),
        meta=make_meta(model_path="m", revision=None, scheduler_config={}, num_steps=2, eta=1.0, guidance_scale=3.0, negative_prompt=""),
    ), d)


def test_label_with_painted_maps(tmp_path, capsys):
    _traj(tmp_path / "t")
    maps = tmp_path / "maps"
    maps.mkdir()
    for i in range(2):
        np.save(maps / f"{i:06d}.npy", np.full((8, 8), 0.25 * (i + 1)))
    args = ["label", "--params", "/dev/null", "--trajectories", str(tmp_path / "t"), "--out", str(tmp_path / "out"),
            "reward.name=painted_maps", f"reward.kwargs={{path: {maps}}}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "no map for 1 of 3 samples (indices 2)" in err and str(maps) in err and not (tmp_path / "out").exists()
    np.save(maps / "2.npy", np.full((8, 8), 0.75))
    assert main(args) == 0
    got, info = load_reward_maps(tmp_path / "out", 3, (8, 8))
    assert got[:, 0, 0].tolist() == [0.25, 0.5, 0.75] and info["labeller"] == "painted_maps"
