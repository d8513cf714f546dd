"""`pxpo base build`: deterministic, refuses to reuse a model built with another spec, and the versioned default follows prompts."""

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from pxpo.errors import PxpoInputError
from pxpo.stages.base import build_base_model

REPO = Path(__file__).resolve().parents[2]


def _weights(d: Path) -> dict:
    from safetensors.torch import load_file

    return {f"{p.parent.name}/{k}": v for p in sorted(d.glob("*/*.safetensors")) for k, v in load_file(str(p)).items()}


def test_build_is_deterministic_and_records_its_spec(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    build_base_model(a, vae_steps=3, unet_steps=3, progress=False)
    build_base_model(b, vae_steps=3, unet_steps=3, progress=False)
    wa, wb = _weights(a), _weights(b)
    assert set(wa) == set(wb) and {k.split("/")[0] for k in wa} == {"unet", "vae", "text_encoder"}
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    spec = json.loads((a / "build.json").read_text())["spec"]
    assert spec["ink"] == "colours" and spec["unet_steps"] == 3

    assert build_base_model(a, vae_steps=3, unet_steps=3, progress=False) is None  # same spec: reused
    with pytest.raises(PxpoInputError, match=r"build\.json.*unet_steps=3 \(asked 5\).*--force"):
        build_base_model(a, vae_steps=3, unet_steps=5, progress=False)


def test_the_versioned_default_is_the_default_spec_and_follows_the_prompt():
    """models/base is in git (dvc.yaml: cache false): built with params.yaml's budget, and it draws the prompted digit."""
    import yaml
    from diffusers import StableDiffusionPipeline

    from pxpo.embedded.architecture import BaseModelSpec
    from pxpo.embedded.digits import evaluate_digits

    d = REPO / "models" / "base"
    built = json.loads((d / "build.json").read_text())
    budget = yaml.safe_load((REPO / "params.yaml").read_text())["base"]
    want = json.loads(json.dumps(asdict(BaseModelSpec(vae_steps=budget["vae_steps"], unet_steps=budget["unet_steps"]))))
    assert built["spec"] == want
    assert built["prompt_following_accuracy"] >= 0.95
    pipe = StableDiffusionPipeline.from_pretrained(str(d), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    images, acc = evaluate_digits(pipe, per_digit=3, seed=7)  # fresh seeds, not the build's
    assert acc >= 0.9, f"the versioned base model drew the prompted digit on {acc:.2f} of 30 samples"
    colours = images.flatten(2).amax(2)  # (30, 3): brightest value per channel ~ each sample's ink colour
    assert (colours.std(0) > 0.15).all(), "the base model should ink digits in many colours (the ink_colour task needs it)"
