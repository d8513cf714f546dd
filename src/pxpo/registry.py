"""MLflow model registry: the trained policy as a pyfunc model, aliases ``challenger`` / ``champion``.

The logged model holds the policy (LoRA or UNet) and, when the base model is a
local directory under 500 MB, the base pipeline itself (self-contained);
otherwise it records the base's hub id / path and revision. Loading rebuilds a
diffusers pipeline: :func:`load_registered_pipeline`.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import mlflow.pyfunc

from . import __version__

ALIAS_CHALLENGER = "challenger"
ALIAS_CHAMPION = "champion"


class DiffusersPolicyModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: ``predict`` takes a DataFrame with ``prompt`` (optional ``seed``,
    ``num_inference_steps``, ``guidance_scale``) and returns ``image`` as base64 PNG."""

    def load_context(self, context):
        import torch

        from .models import load_pipeline, load_policy_into

        meta = json.loads(Path(context.artifacts["pxpo_meta"]).read_text())
        base = context.artifacts.get("base", meta["base_model"])
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.pipe = load_pipeline(str(base), revision=meta.get("revision"), device=device, sampler=meta.get("sampler", "ddim"))
        load_policy_into(self.pipe, context.artifacts["policy"])
        self.meta = meta

    def predict(self, context, model_input, params=None):
        import pandas as pd
        import torch

        rows = model_input.to_dict("records")
        size = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        out = []
        for r in rows:
            img = self.pipe(
                r["prompt"],
                height=size,
                width=size,
                num_inference_steps=int(r.get("num_inference_steps") or self.meta.get("num_steps", 20)),
                guidance_scale=float(r.get("guidance_scale") or self.meta.get("guidance_scale", 3.0)),
                generator=torch.Generator().manual_seed(int(r.get("seed") or 0)),
            ).images[0]
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            out.append(base64.b64encode(buf.getvalue()).decode())
        return pd.DataFrame({"image": out})


def _dir_size(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def log_policy_model(run_id: str, *, base_model: str, policy_dir: Path, name: str = "policy", include_base: bool | None = None,
                     metrics: dict | None = None, revision: str | None = None, sampler: str = "ddim", num_steps: int = 20,
                     guidance_scale: float = 3.0) -> str:
    """Log the policy as a pyfunc model in run ``run_id``; return its model URI."""
    import tempfile

    import mlflow

    policy_dir = Path(policy_dir)
    base_path = Path(base_model)
    if include_base is None:
        include_base = base_path.is_dir() and _dir_size(base_path) < 500 * 2**20
    policy_part = policy_dir / "lora" if (policy_dir / "lora").is_dir() else policy_dir / "model" / "unet"
    with tempfile.TemporaryDirectory() as tmp:
        meta = Path(tmp) / "pxpo_meta.json"
        meta.write_text(json.dumps({
            "base_model": str(base_model), "revision": revision, "sampler": sampler, "num_steps": num_steps,
            "guidance_scale": guidance_scale, "pxpo_version": __version__, "metrics": metrics or {},
        }, default=str))
        artifacts = {"policy": str(policy_part), "pxpo_meta": str(meta)}
        if include_base:
            artifacts["base"] = str(base_path)
        import contextlib

        active = mlflow.active_run()
        ctx = contextlib.nullcontext() if active is not None and active.info.run_id == run_id else mlflow.start_run(run_id=run_id)
        with ctx:
            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=DiffusersPolicyModel(),
                artifacts=artifacts,
                pip_requirements=["torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", f"pxpo=={__version__}"],
                metadata={"pxpo_version": __version__, "base_model": str(base_model)},
            )
    return info.model_uri


def _version_metric(client, name: str, version: str, metric: str):
    mv = client.get_model_version(name, version)
    v = mv.tags.get(f"metric.{metric}")
    return float(v) if v is not None else None


def register_policy(model_uri: str, registered_name: str, *, metrics: dict, primary_metric: str, higher_is_better: bool = True,
                    margin: float = 0.0, validations_passed: bool, source_hash: str) -> dict:
    """Register (or reuse, by ``source_hash``) a model version, alias it ``challenger``,
    and promote it to ``champion`` if it passes the gate. Returns the decision."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    try:
        client.get_registered_model(registered_name)
    except MlflowException:
        client.create_registered_model(registered_name, description="pxpo policies (RL fine-tuned diffusion models)")
    existing = client.search_model_versions(f"name = '{registered_name}' and tag.`pxpo.source_hash` = '{source_hash}'")
    if existing:
        version = str(existing[0].version)
        reused = True
    else:
        mv = mlflow.register_model(model_uri, registered_name, tags={"pxpo.source_hash": source_hash})
        version = str(mv.version)
        reused = False
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                client.set_model_version_tag(registered_name, version, f"metric.{k}", str(v))
    client.set_model_version_tag(registered_name, version, "validation", "passed" if validations_passed else "failed")
    client.set_registered_model_alias(registered_name, ALIAS_CHALLENGER, version)

    challenger_metric = float(metrics[primary_metric])
    try:
        champ = client.get_model_version_by_alias(registered_name, ALIAS_CHAMPION)
        champ_version = str(champ.version)
    except MlflowException:
        champ, champ_version = None, None
    champ_metric = _version_metric(client, registered_name, champ_version, primary_metric) if champ is not None else None

    if not validations_passed:
        promoted, reason = False, "validation did not pass"
    elif champ is None:
        promoted, reason = True, "no champion yet"
    elif champ_version == version:
        promoted, reason = True, "already champion"
    else:
        delta = (challenger_metric - champ_metric) if higher_is_better else (champ_metric - challenger_metric)
        promoted = delta > margin
        reason = f"{primary_metric} {challenger_metric:.4f} vs champion v{champ_version} {champ_metric:.4f}: delta {delta:+.4f} {'>' if promoted else '<='} margin {margin}"
    if promoted:
        client.set_registered_model_alias(registered_name, ALIAS_CHAMPION, version)
    return {
        "version": version,
        "reused_version": reused,
        "promoted": promoted,
        "reason": reason,
        "champion_version": version if promoted else champ_version,
        "champion_metric": challenger_metric if promoted else champ_metric,
        "challenger_metric": challenger_metric,
        "primary_metric": primary_metric,
    }


def load_registered_pipeline(model_uri: str):
    """A diffusers pipeline (base + policy) from a registered model, e.g. ``models:/pxpo-digits@champion``."""
    model = mlflow.pyfunc.load_model(model_uri)
    return model.unwrap_python_model().pipe
