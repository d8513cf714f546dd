"""The embedded flow default (tiny SD3) and the SD3.5-Medium-shaped random fixture."""

import json

import pytest
import torch

from pxpo.cli import main
from pxpo.embedded import random_sd
from pxpo.embedded.sd3 import SD3Spec, build_sd3_base, collapsed_t5_block, make_tiny_sd3_pipeline


def test_tiny_sd3_is_a_stock_pipeline_that_generates():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    pipe = make_tiny_sd3_pipeline(seed=0)
    assert isinstance(pipe, StableDiffusion3Pipeline) and pipe.text_encoder_3 is None
    assert isinstance(pipe.transformer, SD3Transformer2DModel) and isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    out = pipe(["a handwritten digit 3"], height=16, width=16, num_inference_steps=2, guidance_scale=2.0, output_type="pt").images
    assert out.shape == (1, 3, 16, 16) and torch.isfinite(out).all()
    embeds, _, pooled, _ = pipe.encode_prompt(["a handwritten digit 3"], None, None, device="cpu", do_classifier_free_guidance=False)
    assert embeds.shape == (1, 16 + 256, 64) and pooled.shape == (1, 64)  # CLIP tokens + the zero T5 block
    assert embeds[:, 16:].abs().max() == 0


def test_collapsed_t5_block_is_the_stock_encoding_exactly():
    """Pretraining's shortcut: one zero token with +log 256 logit == the pipeline's 256 zero tokens."""
    pipe = make_tiny_sd3_pipeline(seed=1)
    tr = pipe.transformer
    with torch.no_grad():
        torch.manual_seed(0)
        for p in tr.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        x, t = torch.randn(3, 4, 8, 8), torch.tensor([900.0, 500.0, 100.0])
        prompts = ["a handwritten digit 3", "a handwritten digit 8", ""]
        full, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False)
        one, _, _, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False, max_sequence_length=1)
        ref = tr(hidden_states=x, timestep=t, encoder_hidden_states=full, pooled_projections=pooled).sample
        with collapsed_t5_block(64 + 16 + 1):
            fast = tr(hidden_states=x, timestep=t, encoder_hidden_states=one, pooled_projections=pooled).sample
        plain = tr(hidden_states=x, timestep=t, encoder_hidden_states=one, pooled_projections=pooled).sample
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)
    assert (plain - ref).abs().max() > 1e-2  # without the correction one token is not 256


def test_build_pretrains_checks_and_saves(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    spec = SD3Spec(vae_steps=2, flow_steps=3, batch_size=4, eval_per_digit=1, eval_steps=2)
    stats = build_sd3_base(tmp_path / "sd3", spec, progress=False)
    assert 0.0 <= stats["prompt_following_accuracy"] <= 1.0 and stats["eval"]["samples"] == 10
    assert stats["params"]["transformer"] > 0 and stats["vae_scaling_factor"] > 0
    saved = json.loads((tmp_path / "sd3" / "build.json").read_text())
    assert saved["spec"]["flow_steps"] == 3 and (tmp_path / "sd3" / "samples.png").is_file()
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path / "sd3", text_encoder_3=None, tokenizer_3=None)
    assert pipe.vae.config.shift_factor == pytest.approx(stats["vae_shift_factor"])


def test_cli_routes_arch_sd3_and_refuses_unknown(tmp_path, monkeypatch, capsys):
    import pxpo.embedded.sd3 as sd3

    seen = {}

    def fake(out, spec, progress=True):
        seen.update(out=out, steps=spec.flow_steps)
        return {"prompt_following_accuracy": 0.5, "total_seconds": 1.0}

    monkeypatch.setattr(sd3, "build_sd3_base", fake)
    assert main(["base", "build", "--arch", "sd3", "--out", str(tmp_path / "m"), "--unet-steps", "7", "--quiet"]) == 0
    assert seen == {"out": tmp_path / "m", "steps": 7}
    assert main(["base", "build", "--arch", "sd9", "--out", str(tmp_path / "x")]) == 2
    assert "sd3" in capsys.readouterr().err


def test_sd35m_shapes_match_the_published_parameter_counts():
    with torch.device("meta"):
        c = random_sd.random_components("sd35m")
    counts = {k: sum(p.numel() for p in c[k].parameters()) for k in ("transformer", "vae", "text_encoder", "text_encoder_2")}
    # SD3.5 Medium's MMDiT-X (2.24 B), its 16-channel VAE, CLIP-L/14 and OpenCLIP-bigG/14 with projections
    assert counts == {"transformer": 2_243_171_520, "vae": 83_819_683, "text_encoder": 123_650_304, "text_encoder_2": 694_659_840}
    assert c["text_encoder_3"] is None and c["scheduler"].config.shift == 3.0
    assert c["transformer"].config.sample_size * 8 == 1024


def test_sd3_fixture_saves_and_loads_as_a_stock_pipeline(tmp_path, monkeypatch):
    from diffusers import StableDiffusion3Pipeline

    tr = dict(random_sd.SD35M_TRANSFORMER, num_layers=2, num_attention_heads=2, attention_head_dim=8, joint_attention_dim=32,
              caption_projection_dim=16, pooled_projection_dim=32, dual_attention_layers=(0,), sample_size=8, pos_embed_max_size=8)
    vae = dict(random_sd.SD35M_VAE, block_out_channels=(8, 8, 16, 16), norm_num_groups=8, sample_size=64, layers_per_block=1)
    clip = dict(random_sd.CLIP_L, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, projection_dim=16, vocab_size=1000)
    monkeypatch.setitem(random_sd.SD3_ARCHS, "small3", (tr, vae, (clip, clip), random_sd.SD35M_SCHEDULER))
    out = tmp_path / "fixture"
    assert main(["base", "random", "--arch", "small3", "--dtype", "float32", "--out", str(out)]) == 0
    info = json.loads((out / "pxpo_fixture.json").read_text())
    assert set(info["parameters"]) == {"transformer", "vae", "text_encoder", "text_encoder_2"}
    pipe = StableDiffusion3Pipeline.from_pretrained(out, text_encoder_3=None, tokenizer_3=None)
    assert pipe.transformer.config.num_layers == 2 and pipe.tokenizer.model_max_length == 77
