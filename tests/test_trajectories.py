"""The trajectory artifact: round trip, validation, atomic writes."""

import json

import pytest
import torch

from pxpo.errors import PxpoInputError
from pxpo.storage import atomic_dir
from pxpo.trajectories import (
    Trajectories,
    load_reward_maps,
    load_trajectories,
    make_meta,
    quantize_images,
    save_reward_maps,
    save_trajectories,
)


def _traj(n=3, t=4):
    g = torch.Generator().manual_seed(0)
    return Trajectories(
        latents=torch.randn(n, t + 1, 4, 8, 8, generator=g),
        log_probs=torch.randn(n, t, 4, 8, 8, generator=g),
        timesteps=torch.arange(t * 250, 0, -250),
        prompt_embeds=torch.randn(n, 16, 32, generator=g),
        negative_prompt_embeds=torch.randn(1, 16, 32, generator=g),
        prompts=[f"p{i}" for i in range(n)],
        seeds=list(range(n)),
        images=quantize_images(torch.rand(n, 3, 16, 16, generator=g)),
        meta=make_meta(model_path="m", revision=None, scheduler_config={"a": 1}, num_steps=t, eta=1.0, guidance_scale=3.0, negative_prompt=""),
    )


def test_roundtrip(tmp_path):
    tr = _traj()
    save_trajectories(tr, tmp_path / "t")
    back = load_trajectories(tmp_path / "t")
    for k in ("latents", "log_probs", "timesteps", "prompt_embeds", "negative_prompt_embeds"):
        assert torch.equal(getattr(back, k), getattr(tr, k))
    torch.testing.assert_close(back.images, tr.images, atol=1e-6, rtol=0)  # PNG is lossless at 8 bits
    assert back.prompts == tr.prompts and back.seeds == tr.seeds
    meta = json.loads((tmp_path / "t" / "meta.json").read_text())
    assert meta["format"] == "pxpo-trajectories" and meta["num_samples"] == 3 and meta["pxpo_version"]
    lines = (tmp_path / "t" / "samples.jsonl").read_text().splitlines()
    assert json.loads(lines[1]) == {"index": 1, "prompt": "p1", "seed": 1, "image": "images/000001.png"}


def test_reward_maps_roundtrip_and_checks(tmp_path):
    save_trajectories(_traj(), tmp_path / "t")
    maps = torch.rand(3, 16, 16)
    save_reward_maps(tmp_path / "t", maps, {"labeller": "x"})
    back, info = load_reward_maps(tmp_path / "t", 3, (16, 16))
    assert torch.equal(back, maps) and info["labeller"] == "x"
    with pytest.raises(PxpoInputError, match=r"expected \(4, 16, 16\)"):
        load_reward_maps(tmp_path / "t", 4, (16, 16))
    bad = maps.clone()
    bad[1, 0, 0] = float("nan")
    save_reward_maps(tmp_path / "t", bad, {})
    with pytest.raises(PxpoInputError, match="NaN"):
        load_reward_maps(tmp_path / "t", 3, (16, 16))


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int64, torch.bool])
def test_integer_reward_maps_are_refused(tmp_path, dtype):
    """int8 maps used to reach the trainer and crash in mean() (RuntimeError, exit 1)."""
    from safetensors.torch import save_file

    save_trajectories(_traj(), tmp_path / "t")
    save_file({"maps": torch.ones(3, 16, 16, dtype=dtype)}, str(tmp_path / "t" / "reward_maps.safetensors"))
    with pytest.raises(PxpoInputError, match="not floating point") as e:
        load_reward_maps(tmp_path / "t", 3, (16, 16))
    assert "reward_maps.safetensors" in str(e.value) and e.value.exit_code == 2


def test_half_precision_maps_are_converted_to_float32(tmp_path):
    from safetensors.torch import save_file

    save_trajectories(_traj(), tmp_path / "t")
    save_file({"maps": torch.rand(3, 16, 16).half()}, str(tmp_path / "t" / "reward_maps.safetensors"))
    maps, _ = load_reward_maps(tmp_path / "t", 3, (16, 16))
    assert maps.dtype == torch.float32


def test_corrupt_artifact_is_named(tmp_path):
    save_trajectories(_traj(), tmp_path / "t")
    (tmp_path / "t" / "trajectories.safetensors").write_bytes(b"garbage")
    with pytest.raises(PxpoInputError, match="trajectories.safetensors"):
        load_trajectories(tmp_path / "t")
    with pytest.raises(PxpoInputError, match="missing"):
        load_trajectories(tmp_path / "nothing")


def test_failed_write_leaves_previous_artifact_intact(tmp_path):
    save_trajectories(_traj(), tmp_path / "t")
    before = sorted(p.name for p in (tmp_path / "t").iterdir())
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "t") as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("crash mid-write")
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["t"]  # no temp dirs left behind


def test_optional_sdxl_fields_roundtrip_and_stay_absent_for_sd(tmp_path):
    """pooled embeddings and time ids are written only when set; an SD artifact (and an older one) loads them as None."""
    from safetensors.torch import load_file

    sd = _traj()
    save_trajectories(sd, tmp_path / "sd")
    assert set(load_file(str(tmp_path / "sd" / "trajectories.safetensors"))) == {"latents", "log_probs", "timesteps", "prompt_embeds", "negative_prompt_embeds"}
    back = load_trajectories(tmp_path / "sd", with_images=False)
    assert back.pooled_prompt_embeds is None and back.time_ids is None and back.cond().pooled is None

    import dataclasses

    xl = dataclasses.replace(sd, pooled_prompt_embeds=torch.randn(3, 24), negative_pooled_prompt_embeds=torch.zeros(1, 24),
                             time_ids=torch.tensor([[16.0, 16, 0, 0, 16, 16]]).expand(3, 6), negative_time_ids=torch.tensor([[16.0, 16, 0, 0, 16, 16]]))
    save_trajectories(xl, tmp_path / "xl")
    back = load_trajectories(tmp_path / "xl", with_images=False)
    c, u = back.cond([2, 0]), back.uncond()
    assert torch.equal(c.pooled, xl.pooled_prompt_embeds[[2, 0]]) and torch.equal(c.time_ids, xl.time_ids[[2, 0]])
    assert torch.equal(u.pooled, xl.negative_pooled_prompt_embeds) and u.time_ids.shape == (1, 6)
    part = back.select(slice(1, 3))
    assert len(part) == 2 and part.pooled_prompt_embeds.shape == (2, 24) and part.prompts == ["p1", "p2"]
