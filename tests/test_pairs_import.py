"""`pxpo pairs import`: a folder of image pairs a team already has -> a trajectory directory diffusion_dpo trains on (issue 24, item 3)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pxpo.cli import main

TINY = ["sample.num_steps=3", "train.batch_size=2", "train.probe_every=0", "train.learning_rate=1e-2"]


def _pairs(tmp_path, size=16, n=3):
    """n pairs of random images (A, B), a grey-level map for pair 0, whole-image preferences for the others."""
    d = tmp_path / "pairs"
    d.mkdir()
    rng = np.random.default_rng(0)
    for p in range(n):
        for side in "ab":
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(d / f"{p}_{side}.png")
    m = np.full((size, size), 128, np.uint8)
    m[:, : size // 2] = 255  # A better on the left half
    m[0, -1] = 0  # B better in one pixel
    Image.fromarray(m, "L").save(d / "0_map.png")
    recs = [{"prompt": "a handwritten digit 3", "a": "0_a.png", "b": "0_b.png", "map": "0_map.png"},
            {"prompt": "a handwritten digit 5", "a": "1_a.png", "b": "1_b.png", "preference": "B"},
            {"prompt": "a handwritten digit 7", "a": "2_a.png", "b": "2_b.png", "preference": 0.5}][:n]
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return d, prefs, recs


def test_import_writes_the_documented_format_and_diffusion_dpo_trains_on_it(tmp_path, tiny_model_dir, capsys):
    from pxpo.models import load_pipeline
    from pxpo.trajectories import load_preference_maps, load_trajectories

    images, prefs, recs = _pairs(tmp_path)
    over = [f"model.path={tiny_model_dir}", *TINY]
    out = tmp_path / "traj"
    assert main(["pairs", "import", "--images", str(images), "--prefs", str(prefs), "--out", str(out), "--", *over]) == 0
    printed = capsys.readouterr().out
    assert "imported 3 pairs (1 preference maps, 2 whole-image" in printed and "sample.pairs=true sample.batch_size=6 sample.num_batches=1" in printed, printed

    traj = load_trajectories(out)
    assert len(traj) == 6 and traj.prompts == [r["prompt"] for r in recs for _ in range(2)]
    assert traj.meta["pairs"] == {"shared_steps": None} and traj.meta["imported"]["prefs"] == str(prefs)
    assert traj.meta["num_steps"] == 3 and traj.latents.shape[1] == 4 and traj.log_probs.abs().sum() == 0
    # the images as given (8-bit), and latents[:, -1] the VAE's encodings of them (mean, x scaling_factor)
    a0 = np.asarray(Image.open(images / "0_a.png"), np.float32) / 255
    assert torch.allclose(traj.images[0].permute(1, 2, 0), torch.from_numpy(a0), atol=1e-6)
    vae = load_pipeline(str(tiny_model_dir)).vae
    with torch.no_grad():
        want = vae.encode(traj.images[:2] * 2 - 1).latent_dist.mean * vae.config.scaling_factor
    assert torch.allclose(traj.latents[:2, -1], want, atol=1e-5)
    assert traj.latents[:, :-1].abs().sum() == 0
    records = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert [(r["pair"], r["side"]) for r in records[:2]] == [(0, "A"), (0, "B")]

    maps, pairs, info = load_preference_maps(out)
    assert pairs.tolist() == [[0, 1], [2, 3], [4, 5]] and info["source"] == "import" and info["maps"] == 1
    assert maps[0, 3, 2] == 1 and maps[0, 3, 12] == 0 and maps[0, 0, 15] == -1  # 255 -> +1, 128 -> 0, 0 -> -1
    assert (maps[1] == -1).all() and (maps[2] == 0.5).all()

    # one diffusion_dpo epoch on the imported pairs (the command the import printed)
    pol = tmp_path / "policy"
    train = ["train", "--trajectories", str(out), "--out", str(pol), "--rounds", "1", "--", *over, "train.algorithm=diffusion_dpo",
             "sample.pairs=true", "sample.batch_size=6", "sample.num_batches=1"]
    assert main(train) == 0
    hist = [json.loads(x) for x in (pol / "metrics.jsonl").read_text().splitlines()]
    assert hist[0]["optimizer_steps"] == 3 and 0 <= hist[0]["pref_accuracy"] <= 1 and np.isfinite(hist[0]["loss"])
    assert (pol / "model").is_dir() or (pol / "lora").is_dir()

    # no sampler log-probs: another algorithm is refused, naming the fix
    capsys.readouterr()
    assert main([*train[:4], str(tmp_path / "x"), *train[5:-4], "train.algorithm=d3po", *train[-3:]]) == 2
    assert "train.algorithm=diffusion_dpo" in capsys.readouterr().err


def test_resize_csv_and_npy_maps(tmp_path, tiny_model_dir):
    from pxpo.trajectories import load_preference_maps, load_trajectories

    images, _, _ = _pairs(tmp_path, size=32, n=2)
    np.save(images / "0_map.npy", np.where(np.arange(32)[None, :] < 16, 1.0, -1.0).repeat(32, 0).astype(np.float32))
    prefs = tmp_path / "prefs.csv"
    prefs.write_text("prompt,a,b,preference,map\na handwritten digit 3,0_a.png,0_b.png,,0_map.npy\na handwritten digit 5,1_a.png,1_b.png,A,\n")
    out = tmp_path / "traj"
    over = [f"model.path={tiny_model_dir}", *TINY]
    assert main(["pairs", "import", "--images", str(images), "--prefs", str(prefs), "--out", str(out), "--", *over]) == 2  # 32 x 32, not 16 x 16
    assert not out.exists()
    assert main(["pairs", "import", "--images", str(images), "--prefs", str(prefs), "--out", str(out), "--resize", "--", *over]) == 0
    assert load_trajectories(out).images.shape == (4, 3, 16, 16)
    maps, _, _ = load_preference_maps(out)
    assert maps.shape == (2, 16, 16) and (maps[0, :, :7] == 1).all() and (maps[0, :, 9:] == -1).all() and (maps[1] == 1).all()


@pytest.mark.parametrize("line,expect", [
    ('{"prompt": "x", "a": "0_a.png", "b": "0_b.png"}', "neither a preference nor a map"),
    ('{"prompt": "x", "a": "0_a.png", "b": "0_b.png", "preference": 1, "map": "0_map.png"}', "both a preference and a map"),
    ('{"prompt": "x", "a": "0_a.png", "b": "0_b.png", "preference": 2}', "preference: 2 is not in [-1, 1]"),
    ('{"prompt": "x", "a": "0_a.png", "b": "0_b.png", "preference": "better"}', "preference: 'better' is not a number"),
    ('{"a": "0_a.png", "b": "0_b.png", "preference": 1}', "prompt: missing"),
    ('{"prompt": "x", "a": "nope.png", "b": "0_b.png", "preference": 1}', "nope.png not found"),
    ('{"prompt": "x", "a": "0_a.png", "b": "0_b.png", "map": "0_a.png"}', "not grayscale"),
    ('{"prompt": "x", "a": "0_a.png", "b": "0_b.png", "preference": 1', "not valid JSON"),
])
def test_bad_input_names_the_file_field_and_fix_and_writes_nothing(tmp_path, tiny_model_dir, capsys, line, expect):
    images, _, _ = _pairs(tmp_path, n=1)
    prefs = tmp_path / "bad.jsonl"
    prefs.write_text(line + "\n")
    out = tmp_path / "traj"
    assert main(["pairs", "import", "--images", str(images), "--prefs", str(prefs), "--out", str(out), "--", f"model.path={tiny_model_dir}"]) == 2
    err = capsys.readouterr().err
    assert expect in err and f"{prefs}" in err and "Fix:" in err, err
    assert not out.exists() and not list(tmp_path.glob(".traj*"))


def test_import_encodes_with_a_flow_models_vae_and_diffusion_dpo_trains_it(tmp_path, tiny_sd3_dir):
    """SD3-class (flow) models: latents are (z - shift_factor) x scaling_factor of the model's VAE; Diffusion-DPO on the velocity."""
    from pxpo.models import load_pipeline
    from pxpo.trajectories import load_trajectories

    from pxpo.core.sampling import latent_hw

    pipe = load_pipeline(str(tiny_sd3_dir), sampler="flow_sde")
    h, _ = latent_hw(pipe.unet.config)
    size = h * pipe.vae_scale_factor
    images, prefs, _ = _pairs(tmp_path, size=size, n=2)
    over = [f"model.path={tiny_sd3_dir}", "sample.sampler=flow_sde", *TINY]
    out = tmp_path / "traj"
    assert main(["pairs", "import", "--images", str(images), "--prefs", str(prefs), "--out", str(out), "--", *over]) == 0
    traj = load_trajectories(out)
    assert traj.pooled_prompt_embeds is not None and traj.meta["sampler"] == "flow_sde"
    with torch.no_grad():
        z = pipe.vae.encode(traj.images[:1] * 2 - 1).latent_dist.mean
    want = (z - (pipe.vae.config.shift_factor or 0)) * pipe.vae.config.scaling_factor
    assert torch.allclose(traj.latents[:1, -1], want, atol=1e-5)
    pol = tmp_path / "policy"
    assert main(["train", "--trajectories", str(out), "--out", str(pol), "--rounds", "1", "--", *over, "train.algorithm=diffusion_dpo",
                 "sample.pairs=true", "sample.batch_size=4", "sample.num_batches=1"]) == 0
    hist = [json.loads(x) for x in (pol / "metrics.jsonl").read_text().splitlines()]
    assert hist[0]["optimizer_steps"] == 2 and np.isfinite(hist[0]["loss"])
