"""SDXL in the DDIM path (issue 15 item 5) on a random tiny SDXL pipeline.

Two CLIP text encoders (the second with projection: the pooled embedding),
a UNet with ``addition_embed_type: text_time``, the project's tokenizer.

* pxpo's loader returns a StableDiffusionXLPipeline with a DDIM scheduler;
* the conditioning equals diffusers' ``encode_prompt`` / added time ids;
* pxpo's rollout equals diffusers' own SDXL pipeline (same seeds, eta 1);
* stored log-probs are recomputed exactly, the artifact round-trips the pooled
  embeddings and time ids, and PXPO / DDPO train a LoRA that diffusers' SDXL
  pipeline loads.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from pxpo.config import load_config
from pxpo.core.policies import make_policy
from pxpo.core.policy import Cond
from pxpo.core.sampling import encode_cond

PROMPTS = ["a handwritten digit 3", "a handwritten digit 7"]


def make_tiny_sdxl(seed: int = 0):
    """A random-weight StableDiffusionXLPipeline: 16 px images, 8x8x4 latents, text widths 32 + 32."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from pxpo.embedded.architecture import SD_SCHEDULER
    from pxpo.embedded.tokenizer import build_tokenizer

    torch.manual_seed(seed)
    tok = build_tokenizer(16)

    def text_config(**kw):
        return CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              max_position_embeddings=16, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id, **kw)

    te1 = CLIPTextModel(text_config())
    te2 = CLIPTextModelWithProjection(text_config(projection_dim=24))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), cross_attention_dim=64, norm_num_groups=16, transformer_layers_per_block=1,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 24,
    )
    with torch.no_grad():  # random init predicts ~0: make the predictions non-trivial
        for p in unet.conv_out.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(32, 64), latent_channels=4, layers_per_block=1, norm_num_groups=16, sample_size=16)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok, unet=unet,
                                     scheduler=DDIMScheduler(**SD_SCHEDULER), force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("models") / "tiny-sdxl"
    make_tiny_sdxl().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def sdxl(sdxl_dir):
    from pxpo.models import load_pipeline

    return load_pipeline(str(sdxl_dir))


def test_loads_as_sdxl_with_ddim(sdxl):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    assert isinstance(sdxl, StableDiffusionXLPipeline) and isinstance(sdxl.scheduler, DDIMScheduler)
    assert not any(p.requires_grad for p in sdxl.text_encoder_2.parameters())


def test_cond_equals_diffusers_encode_prompt(sdxl):
    with torch.no_grad():
        c = encode_cond(sdxl, PROMPTS)
        pe, ne, pp, npp = sdxl.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True)
        neg = encode_cond(sdxl, [""], negative=True)
    assert c.embeds.shape == (2, 16, 64) and c.pooled.shape == (2, 24) and c.time_ids.shape == (2, 6)
    torch.testing.assert_close(c.embeds, pe)
    torch.testing.assert_close(c.pooled, pp)
    assert torch.equal(neg.embeds, ne[:1]) and torch.equal(neg.pooled, npp[:1])  # zeros: force_zeros_for_empty_prompt
    ids = sdxl._get_add_time_ids((16, 16), (0, 0), (16, 16), dtype=torch.float32, text_encoder_projection_dim=24)
    torch.testing.assert_close(c.time_ids, ids.expand(2, 6))


def _cfg(sdxl_dir, out=None, *extra):
    return load_config(None, [f"model.path={sdxl_dir}", f"output_dir={out or 'unused'}", "sample.num_steps=3", "sample.guidance_scale=3.0", *extra])


def test_rollout_equals_diffusers_sdxl_pipeline(sdxl, sdxl_dir):
    """Same seeds, eta 1, guidance 3: pxpo's x_0 is the latent diffusers' StableDiffusionXLPipeline returns."""
    from pxpo.training.rollout import sample_trajectories

    traj = sample_trajectories(sdxl, _cfg(sdxl_dir), PROMPTS, [5, 6])
    assert traj.latents.shape == (2, 4, 4, 8, 8) and traj.pooled_prompt_embeds.shape == (2, 24) and traj.time_ids.shape == (2, 6)
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    ref = sdxl(PROMPTS, num_inference_steps=3, guidance_scale=3.0, eta=1.0, generator=gens, height=16, width=16, output_type="latent").images
    torch.testing.assert_close(traj.latents[:, -1], ref, rtol=1e-4, atol=1e-4)


def test_recomputed_log_probs_equal_stored_and_artifact_roundtrips(sdxl, sdxl_dir, tmp_path):
    from pxpo.training.rollout import sample_trajectories
    from pxpo.trajectories import load_trajectories, save_trajectories

    cfg = _cfg(sdxl_dir)
    traj = sample_trajectories(sdxl, cfg, PROMPTS, [1, 2])
    save_trajectories(traj, tmp_path / "t")
    back = load_trajectories(tmp_path / "t")
    for k in ("pooled_prompt_embeds", "negative_pooled_prompt_embeds", "time_ids", "negative_time_ids"):
        assert torch.equal(getattr(back, k), getattr(traj, k)), k
    policy = make_policy(cfg.sample, sdxl.scheduler)
    den = policy.denoiser(sdxl.unet)
    for j in range(3):
        idx = torch.full((2,), j)
        with torch.no_grad():
            out = policy.log_prob(den, back.latents[:, j], idx, back.latents[:, j + 1], back.cond(), back.uncond())
        torch.testing.assert_close(out.log_prob, back.log_probs[:, j], rtol=1e-5, atol=1e-4)
    # the SDXL UNet refuses a Cond without its pooled embedding and time ids
    with pytest.raises((TypeError, ValueError, AttributeError)):
        policy.log_prob(den, back.latents[:, 0], idx, back.latents[:, 1], Cond(back.prompt_embeds), None)


@pytest.mark.parametrize("algorithm", ["pxpo", "ddpo"])
def test_trains_a_lora_diffusers_sdxl_loads(tmp_path, sdxl_dir, algorithm):
    from diffusers import StableDiffusionXLPipeline

    from pxpo.stages.online import run_online
    from pxpo.tracking import JsonlTracker

    out = tmp_path / "r"
    cfg = _cfg(sdxl_dir, out, "sample.batch_size=4", "train.batch_size=2", "train.epochs=2", f"train.algorithm={algorithm}",
               "train.learning_rate=1e-2", "train.clip_range=0.1", "train.probe_every=0")
    assert run_online(cfg, JsonlTracker(out), progress=False)["completed_epochs"] == 2
    hist = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert hist[0]["optimizer_steps"] == 2 and abs(hist[0]["ratio"] - 1) < 0.5
    lora = load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k or "lora.up" in k)

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=3, guidance_scale=3.0, height=16, width=16, output_type="latent")
    before = pipe(PROMPTS[0], generator=torch.Generator().manual_seed(0), **kw).images
    pipe.load_lora_weights(str(out / "lora"))
    after = pipe(PROMPTS[0], generator=torch.Generator().manual_seed(0), **kw).images
    assert not torch.allclose(before, after)
