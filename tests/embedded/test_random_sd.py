"""The random SD-shaped fixture: SD 1.5's published shapes, saved as a stock pipeline that pxpo loads."""

import json

import pytest
import torch

from pxpo.cli import main
from pxpo.embedded import random_sd


def test_sd15_shapes_match_the_published_parameter_counts():
    with torch.device("meta"):  # no weights allocated
        c = random_sd.random_components("sd15")
    counts = {k: sum(p.numel() for p in c[k].parameters()) for k in ("unet", "vae", "text_encoder")}
    # Stable Diffusion 1.5's UNet, VAE and CLIP ViT-L/14 text encoder
    assert counts == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
    assert c["tokenizer"].model_max_length == 77
    assert c["unet"].config.sample_size * 2 ** (len(c["vae"].config.block_out_channels) - 1) == 512


def test_saved_fixture_loads_through_the_normal_loader(tmp_path, monkeypatch):
    small = dict(random_sd.SD15_UNET, block_out_channels=(32, 32, 64, 64), attention_head_dim=4, norm_num_groups=16, sample_size=8)
    small_vae = dict(random_sd.SD15_VAE, block_out_channels=(16, 16, 32, 32), norm_num_groups=8, sample_size=64)
    small_text = dict(random_sd.SD15_TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, projection_dim=32, vocab_size=1000)
    small["cross_attention_dim"] = 32
    monkeypatch.setitem(random_sd.ARCHS, "small", (small, small_vae, small_text, random_sd.SD15_SCHEDULER))
    out = tmp_path / "fixture"
    assert main(["base", "random", "--arch", "small", "--dtype", "float32", "--out", str(out)]) == 0
    info = json.loads((out / "pxpo_fixture.json").read_text())
    assert "never fine-tune" in info["purpose"] and info["parameters"]["unet"] > 0

    from pxpo.models import load_pipeline

    pipe = load_pipeline(str(out))
    assert pipe.tokenizer.model_max_length == 77 and pipe.unet.config.block_out_channels == [32, 32, 64, 64]
    assert main(["base", "random", "--arch", "small", "--out", str(out)]) == 0  # exists: kept, not rebuilt


def test_unknown_arch_is_a_clear_error(tmp_path, capsys):
    assert main(["base", "random", "--arch", "sd99", "--out", str(tmp_path / "x")]) == 2
    assert "sd15" in capsys.readouterr().err and not (tmp_path / "x").exists()
