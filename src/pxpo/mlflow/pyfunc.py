"""The trained policy as an MLflow pyfunc model (models from code).

The logged model's entry point is :data:`MODEL_CODE`, a two-line script that
builds a :class:`DiffusersPolicyModel`; the ``pxpo`` package is bundled under
``code/`` so the model loads where pxpo is not installed.

Inference settings follow MLflow's convention: the signature declares a
``ParamSchema`` (:func:`signature`), so ``model.predict(df, params={"steps": 8})``
is honoured (a pyfunc model without one drops ``params`` with a warning).
"""

from __future__ import annotations

import base64
import io
import math

import mlflow.pyfunc
import pandas as pd

from ..errors import PxpoInputError

MODEL_CODE = '''"""pxpo policy model (MLflow models-from-code entry point)."""
import mlflow

from pxpo.mlflow.pyfunc import DiffusersPolicyModel

mlflow.models.set_model(DiffusersPolicyModel())
'''

#: inference params (name -> MLflow type); their defaults are the logged sampling settings
PARAMS = {"steps": "long", "guidance": "double", "seed": "long", "negative_prompt": "string"}


def signature(num_steps: int = 20, guidance_scale: float = 3.0, negative_prompt: str = ""):
    """The model signature: input columns, output column, and the ``ParamSchema``.

    Inputs: ``prompt`` (string) and optional per-row overrides ``seed`` (long),
    ``num_inference_steps`` (long), ``guidance_scale`` (double; MLflow refuses
    an integer column there). Output: ``image`` (string, base64 PNG).
    Params (one value for the whole batch): ``steps`` (default ``num_steps``),
    ``guidance`` (default ``guidance_scale``), ``seed`` (default 0, every
    row without its own), ``negative_prompt`` (default ``negative_prompt``).
    """
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    defaults = {"steps": int(num_steps), "guidance": float(guidance_scale), "seed": 0, "negative_prompt": str(negative_prompt or "")}
    return ModelSignature(
        inputs=Schema([
            ColSpec("string", "prompt"),
            ColSpec("long", "seed", required=False),
            ColSpec("long", "num_inference_steps", required=False),
            ColSpec("double", "guidance_scale", required=False),
        ]),
        outputs=Schema([ColSpec("string", "image")]),
        params=ParamSchema([ParamSpec(name, dtype, defaults[name]) for name, dtype in PARAMS.items()]),
    )


class DiffusersPolicyModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper around a diffusers pipeline with the trained policy applied.

    ``predict(df, params=None)`` takes a DataFrame with column ``prompt`` (or a
    single prompt string) and returns a DataFrame with column ``image``: one
    base64-encoded PNG (``S x S`` RGB, ``S`` = UNet sample size x VAE scale
    factor) per row (:func:`decode_image`).

    Per row, each setting is the first of: the row's column (``seed``,
    ``num_inference_steps``, ``guidance_scale``), the param (``seed``,
    ``steps``, ``guidance``), the load-time ``model_config``
    (``num_inference_steps``, ``guidance_scale``, ``negative_prompt``), the
    built-in default (0, 20, 3.0, none). Through ``mlflow.pyfunc.load_model``
    every param is filled with its schema default, which is the sampling
    setting the policy was logged with.

    Load-time ``model_config`` keys (``mlflow.pyfunc.load_model(uri, model_config=...)``
    or ``$MLFLOW_PYFUNC_INFERENCE_CONFIG`` when serving): ``device`` (``auto``:
    CUDA when present), ``dtype``, ``base_model`` / ``revision`` / ``variant``
    (when the base was not copied into the model), ``sampler``, and the
    defaults above.
    """

    def load_context(self, context):
        import torch

        from ..models import load_pipeline, load_policy_into, resolve_dtype

        cfg = dict(context.model_config or {})
        device = cfg.get("device") or "auto"
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = resolve_dtype(cfg.get("dtype") or "float32", device)
        if "base" in context.artifacts:
            base, revision, variant = context.artifacts["base"], None, None
        else:
            base, revision, variant = cfg["base_model"], cfg.get("revision"), cfg.get("variant")
        self.pipe = load_pipeline(str(base), revision=revision, variant=variant, dtype=dtype, device=device,
                                  sampler=cfg.get("sampler") or "ddim")
        load_policy_into(self.pipe, context.artifacts["policy"])
        self.pipe.unet.eval().requires_grad_(False)
        self.config = cfg

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        import torch

        if isinstance(model_input, str):
            model_input = pd.DataFrame({"prompt": [model_input]})
        elif not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        if "prompt" not in model_input.columns:
            raise PxpoInputError("model input", "no `prompt` column", "pass a DataFrame with a `prompt` column")
        params = params or {}
        cfg = getattr(self, "config", {})
        size = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        negative = _opt(params.get("negative_prompt"), cfg.get("negative_prompt")) or None
        out = []
        for r in model_input.to_dict("records"):
            steps = _opt(r.get("num_inference_steps"), params.get("steps"), cfg.get("num_inference_steps"), 20)
            scale = _opt(r.get("guidance_scale"), params.get("guidance"), cfg.get("guidance_scale"), 3.0)
            seed = _opt(r.get("seed"), params.get("seed"), 0)
            with torch.no_grad():
                img = self.pipe(
                    str(r["prompt"]),
                    negative_prompt=negative,
                    height=size,
                    width=size,
                    num_inference_steps=int(steps),
                    guidance_scale=float(scale),
                    generator=torch.Generator().manual_seed(int(seed)),
                ).images[0]
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
        return pd.DataFrame({"image": out})


def _opt(*values):
    """First value that is neither None nor NaN (optional DataFrame columns come back as NaN)."""
    for v in values:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        return v
    return None


def decode_image(b64: str):
    """A ``predict`` output cell -> PIL image."""
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(b64)))
