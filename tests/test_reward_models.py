"""Scalar reward models through transformers (pxpo.reward_models): clip_score and aesthetic, on a tiny random CLIP.

The CLIP is saved with save_pretrained (model and processor), so the labellers load it with
from_pretrained(dir) exactly as they load a hub id; a hub id offline is one clear error.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from pxpo.core import rewards as R
from pxpo.errors import PxpoInputError
from pxpo.labellers import make_reward  # noqa: F401  (registers clip_score and aesthetic)

PROMPTS = ["a handwritten digit 3", "a handwritten digit 7"]


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A random CLIP (hidden 32, 2 layers, 32 x 32 images in 8 x 8 patches) and its processor, saved with save_pretrained."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from pxpo.embedded.tokenizer import build_tokenizer

    tok = build_tokenizer(16)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=16, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    d = tmp_path_factory.mktemp("clip") / "tiny-clip"
    model.save_pretrained(d)
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(d)
    return d


def _smooth_images(b=2, seed=0, h=16, w=16):
    """Low-frequency images (upsampled 4 x 4 noise) in [0, 1], quantised to uint8 levels as PIL sees them."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(b, 3, 4, 4, generator=g), size=(h, w), mode="bilinear", align_corners=False)
    return (x * 255).round() / 255


def _reference_scores(d, images, prompts):
    """transformers' own pipeline: the processor (PIL) and CLIPModel.forward's logits_per_image."""
    from transformers import AutoProcessor, CLIPModel

    model, proc = CLIPModel.from_pretrained(d).eval(), AutoProcessor.from_pretrained(d)
    u8 = [(x * 255).round().to(torch.uint8) for x in images]
    inputs = proc(text=prompts, images=u8, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**inputs).logits_per_image.diagonal(), inputs["pixel_values"]


def test_clip_score_is_transformers_clip_logit(tiny_clip_dir):
    from transformers import AutoProcessor

    from pxpo.reward_models import clip_pixels

    x = _smooth_images()
    want, pixels = _reference_scores(tiny_clip_dir, x, PROMPTS)
    ours = clip_pixels(x, AutoProcessor.from_pretrained(tiny_clip_dir).image_processor)
    assert ours.shape == pixels.shape == (2, 3, 32, 32)
    assert (ours - pixels).abs().mean() < 0.01  # the processor's resize / normalise, in torch (PIL rounds to uint8)
    maps, info = R.make_labeller("clip_score", model=str(tiny_clip_dir))(x, PROMPTS)
    assert maps.shape == (2, 16, 16) and (maps == maps[:, :1, :1]).all()  # one scalar per image, a constant map
    torch.testing.assert_close(maps[:, 0, 0], want, rtol=1e-2, atol=1e-2)
    assert info["scalar"] == pytest.approx(maps[:, 0, 0].tolist())


def test_clip_score_reads_the_prompt_and_batches(tiny_clip_dir):
    x = _smooth_images(1).expand(3, 3, 16, 16)
    fn = R.make_labeller("clip_score", model=str(tiny_clip_dir))
    maps, _ = fn(x, [PROMPTS[0], PROMPTS[1], PROMPTS[0]])
    s = maps[:, 0, 0]
    assert s[0] == pytest.approx(float(s[2]), abs=1e-5) and abs(float(s[0] - s[1])) > 1e-4
    small, _ = R.make_labeller("clip_score", model=str(tiny_clip_dir), batch_size=1)(x, [PROMPTS[0], PROMPTS[1], PROMPTS[0]])
    torch.testing.assert_close(small, maps, rtol=1e-5, atol=1e-5)


def test_clip_score_gets_pixel_credit_from_attribution(tiny_clip_dir):
    """The score is differentiable: the attribution adapter gives it a map whose mean is the score."""
    x = _smooth_images()
    score, _ = R.make_labeller("clip_score", model=str(tiny_clip_dir))(x, PROMPTS)
    fn = R.make_labeller("attribution", base="clip_score", base_kwargs={"model": str(tiny_clip_dir)})
    with torch.no_grad():
        maps, info = fn(x, PROMPTS)
    torch.testing.assert_close(maps.mean((1, 2)), score[:, 0, 0], rtol=1e-4, atol=1e-4)
    assert maps.std((1, 2)).min() > 0


def _head(path, layers):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in layers.items()}, str(path))
    return str(path)


def test_aesthetic_head_in_natural_layer_order(tiny_clip_dir, tmp_path):
    """Layers layers.2 then layers.10 (natural order, as LAION's layers.0 ... layers.7), no activation by default."""
    from transformers import AutoProcessor, CLIPModel

    from pxpo.reward_models import clip_pixels, image_embeddings

    g = torch.Generator().manual_seed(0)
    w1, b1, w2, b2 = torch.randn(8, 16, generator=g), torch.randn(8, generator=g), torch.randn(1, 8, generator=g), torch.randn(1, generator=g)
    head = _head(tmp_path / "head.safetensors", {"layers.10.weight": w2, "layers.10.bias": b2, "layers.2.weight": w1, "layers.2.bias": b1})
    x = _smooth_images()
    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    with torch.no_grad():
        e = F.normalize(image_embeddings(model, clip_pixels(x, AutoProcessor.from_pretrained(tiny_clip_dir).image_processor)), dim=-1)
    for activation, want in [("none", (e @ w1.T + b1) @ w2.T + b2), ("relu", F.relu(e @ w1.T + b1) @ w2.T + b2)]:
        maps, info = R.make_labeller("aesthetic", model=str(tiny_clip_dir), head=head, activation=activation)(x, PROMPTS)
        torch.testing.assert_close(maps[:, 0, 0], want[:, 0], rtol=1e-5, atol=1e-5)
        assert (maps == maps[:, :1, :1]).all()
    linear = _head(tmp_path / "linear.safetensors", {"weight": w2 @ w1, "bias": b2})  # a single linear layer
    maps, _ = R.make_labeller("aesthetic", model=str(tiny_clip_dir), head=linear)(x, PROMPTS)
    torch.testing.assert_close(maps[:, 0, 0], (e @ (w2 @ w1).T + b2)[:, 0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layers, match", [
    ({"weight": torch.zeros(1, 5), "bias": torch.zeros(1)}, r"layer '\(top\)'.* expected weight \(out, 16\)"),
    ({"l.weight": torch.zeros(4, 16), "l.bias": torch.zeros(4)}, "ends in 4 outputs"),
    ({"l.weight": torch.zeros(1, 16), "l.bias": torch.zeros(3)}, r"expected l\.weight \(out, 16\) and l\.bias"),
])
def test_a_bad_head_says_which_tensors_it_expects(tiny_clip_dir, tmp_path, layers, match):
    head = _head(tmp_path / "bad.safetensors", layers)
    with pytest.raises(PxpoInputError, match=match):
        R.make_labeller("aesthetic", model=str(tiny_clip_dir), head=head)


def test_bad_model_references(tiny_clip_dir, tmp_path):
    with pytest.raises(PxpoInputError, match=r"reward\.kwargs\.model: no CLIP model given"):
        R.make_labeller("clip_score")
    with pytest.raises(PxpoInputError, match="neither a directory nor a hub id"):
        R.make_labeller("clip_score", model=str(tmp_path / "no" / "such"))
    with pytest.raises(PxpoInputError, match="holds no CLIPModel"):
        R.make_labeller("clip_score", model=str(tmp_path))
    with pytest.raises(PxpoInputError, match=r"reward\.kwargs\.head: no head file"):
        R.make_labeller("aesthetic", model=str(tiny_clip_dir), head=str(tmp_path / "none.safetensors"))
    with pytest.raises(PxpoInputError, match="activation"):
        R.make_labeller("aesthetic", model=str(tiny_clip_dir), activation="tanh")


def test_a_hub_id_offline_is_one_clear_error_exit_2(tmp_path):
    """`pxpo run` builds the reward before the model: offline, a hub id not in the cache stops it with exit 2."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "pxpo.cli", "run", "--quiet", "reward.name=clip_score",
           "reward.kwargs={model: pxpo-test/no-such-clip}", f"output_dir={tmp_path / 'run'}"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert p.returncode == 2, p.stderr[-3000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in p.stderr
    assert errors[0].startswith("error: reward.kwargs.model: cannot load hub model 'pxpo-test/no-such-clip': offline (HF_HUB_OFFLINE=1)")
    assert "hf download pxpo-test/no-such-clip" in errors[0] and "local directory" in errors[0]


def test_no_network_fails_at_once_without_the_hubs_retries(monkeypatch):
    """Not cached and the hub's host unreachable: one error straight away (huggingface_hub would retry ~1 min)."""
    import pxpo.reward_models as rm

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(rm, "_hub_unreachable", lambda: "cannot reach huggingface.co: test")
    with pytest.raises(PxpoInputError, match="cannot load hub model 'pxpo-test/no-such-clip': not in the local cache and no network"):
        R.make_labeller("clip_score", model="pxpo-test/no-such-clip")
