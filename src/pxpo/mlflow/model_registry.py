"""MLflow model registry: log the policy model, register versions, aliases ``challenger`` / ``champion``.

The logged model (:mod:`pxpo.mlflow.pyfunc`, models from code) holds

* the policy: a LoRA directory (``pytorch_lora_weights.safetensors``) or a full
  UNet directory (``save_pretrained``);
* the base pipeline directory when it is local and under 500 MB
  (self-contained model); otherwise only its reference (absolute path or hub
  id, revision) in the model config, which a loader may override
  (``model_config={"base_model": ...}`` or ``$MLFLOW_PYFUNC_INFERENCE_CONFIG``);
* its evaluation metrics, attached to the MLflow 3 ``LoggedModel``
  (``log_metrics(..., model_id=...)``) and so visible from every registered
  version of it (:func:`version_metrics`).

Registration uses aliases only (never stages): every registered version is
aliased ``challenger``; ``champion`` moves to it when it passes the gate
(:func:`register_policy`). Loading back gives a plain diffusers pipeline:
:func:`load_registered_pipeline`.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import tempfile
import time
import warnings
from pathlib import Path

from .. import __version__
from ..errors import PxpoInputError
from .gates import champion_gate

ALIAS_CHALLENGER = "challenger"
ALIAS_CHAMPION = "champion"
MAX_BASE_MB = 500
# What the model needs at load time, pinned to the versions it was logged with.
REQUIREMENTS = ["torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "pillow", "pandas", "numpy"]


def _numeric(metrics: dict | None) -> dict[str, float]:
    return {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _dir_size(d: Path, stop_after: int | None = None) -> int:
    total = 0
    for f in d.rglob("*"):
        if f.is_file():
            total += f.stat().st_size
            if stop_after is not None and total > stop_after:
                break
    return total


def _policy_part(policy_dir: Path) -> tuple[Path, str]:
    """(directory to log, ``"lora"`` or ``"unet"``) from an output dir, a LoRA dir or a UNet dir."""
    d = Path(policy_dir)
    if (d / "lora" / "pytorch_lora_weights.safetensors").is_file():
        return d / "lora", "lora"
    if (d / "pytorch_lora_weights.safetensors").is_file():
        return d, "lora"
    if (d / "model" / "unet" / "config.json").is_file():
        return d / "model" / "unet", "unet"
    if (d / "config.json").is_file() and any(d.glob("diffusion_pytorch_model*")):
        return d, "unet"
    raise PxpoInputError(
        str(d),
        "no policy found (expected lora/pytorch_lora_weights.safetensors or model/unet/)",
        "pass the output directory of `pxpo train` or `pxpo run`",
    )


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for name in REQUIREMENTS:
        try:
            reqs.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            reqs.append(name)
    return reqs


def log_policy_model(run_id_or_active: str | None = None, *, base_model: str, policy_dir: Path, name: str = "policy",
                     include_base: bool | None = None, metrics: dict | None = None, revision: str | None = None,
                     variant: str | None = None, sampler: str = "ddim", num_steps: int = 20,
                     guidance_scale: float = 3.0, negative_prompt: str = "") -> str:
    """Log the policy as a pyfunc model in a run; return its model URI (``models:/m-...``).

    Args:
        run_id_or_active: the run to attach the model to; None: the active run.
        base_model: the base pipeline: a local diffusers directory or a hub id.
        policy_dir: a ``pxpo train``/``run`` output (``lora/`` or ``model/unet/``),
            a LoRA directory or a UNet directory.
        include_base: copy the base pipeline into the model; None: when it is a
            local directory under 500 MB (else only its reference is recorded).
        metrics: evaluation metrics; the numeric ones are logged to the run
            *and* the logged model (``model_id``), and kept in its metadata.
            NaN and infinite ones go to the run only: MLflow's SQL store keeps
            no NaN on a logged model's metrics (it reads back as 0.0, which a
            later gate would compare as a real value), so such a metric is
            missing there and a gate against it fails closed.
        revision, variant: of a hub base model (recorded, used at load time).
        sampler, num_steps, guidance_scale, negative_prompt: the sampling
            defaults of ``predict`` (the defaults of its ``ParamSchema``).

    Raises:
        PxpoInputError: no policy in ``policy_dir``; ``include_base=True`` for a
            base that is not a local directory; no run to log to.
    """
    import mlflow
    import mlflow.pyfunc

    from ..models import _looks_local
    from .pyfunc import MODEL_CODE, signature

    part, kind = _policy_part(Path(policy_dir))
    base_path = Path(base_model).expanduser()
    local_base = base_path.is_dir()
    if not local_base and _looks_local(str(base_model)):
        raise PxpoInputError(f"base_model={base_model}", "directory not found", "pass the base pipeline directory or a hub id (org/name)")
    if include_base is None:
        include_base = local_base and _dir_size(base_path, stop_after=MAX_BASE_MB * 2**20) < MAX_BASE_MB * 2**20
    elif include_base and not local_base:
        raise PxpoInputError(f"base_model={base_model}", "include_base=True needs a local pipeline directory",
                             "pass a local directory or include_base=None/False to record the reference only")
    base_ref = str(base_path.resolve()) if local_base else str(base_model)
    config = {
        "base_model": base_ref, "revision": revision, "variant": variant, "sampler": sampler,
        "num_inference_steps": int(num_steps), "guidance_scale": float(guidance_scale),
        "negative_prompt": negative_prompt or "", "device": "auto", "dtype": "float32",
    }
    nums = _numeric(metrics)
    metadata = {"pxpo_version": __version__, "base_model": base_ref, "base_revision": revision,
                "base_included": bool(include_base), "policy_kind": kind, "metrics": nums}
    active = mlflow.active_run()
    run_id = run_id_or_active or (active.info.run_id if active else None)
    if run_id is None:
        raise PxpoInputError("log_policy_model", "no run given and no active MLflow run", "pass a run id or call it inside a run")
    import pxpo

    with tempfile.TemporaryDirectory() as tmp:
        code = Path(tmp) / "pxpo"
        shutil.copytree(Path(pxpo.__file__).parent, code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        script = Path(tmp) / "pxpo_policy_model.py"
        script.write_text(MODEL_CODE)
        artifacts = {"policy": str(part)}
        if include_base:
            artifacts["base"] = str(base_path)
        if active is not None and active.info.run_id == run_id:
            ctx = contextlib.nullcontext()
        else:
            ctx = mlflow.start_run(run_id=run_id, nested=active is not None)
        with ctx, warnings.catch_warnings():
            # an input example would make log_model load the model and run predict (slow)
            warnings.filterwarnings("ignore", message=".*input example was not provided.*")
            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=str(script),
                artifacts=artifacts,
                code_paths=[str(code)],
                model_config=config,
                signature=signature(num_steps, guidance_scale, negative_prompt),
                pip_requirements=_requirements(),
                metadata=metadata,
            )
    finite = {k: v for k, v in nums.items() if math.isfinite(v)}
    if finite:
        mlflow.log_metrics(finite, run_id=run_id, model_id=info.model_id, synchronous=True)
    if len(finite) < len(nums):  # on the run only: MLflow's SQL store would turn NaN into 0.0 on the logged model
        from mlflow.entities import Metric

        now = int(time.time() * 1000)  # the client, not mlflow.log_metrics: that links a run's metrics to its logged models
        mlflow.MlflowClient().log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in nums.items() if k not in finite], synchronous=True)
    return info.model_uri


# ----- reading a version back ------------------------------------------------------


def logged_model_id(model_uri: str, *, client=None, _depth: int = 0) -> str | None:
    """The ``LoggedModel`` id behind ``models:/m-...``, ``models:/<name>/<version>`` or ``models:/<name>@<alias>``.

    None for other URIs (``runs:/...``, paths) and for versions registered
    from them.
    """
    import mlflow

    if not model_uri.startswith("models:/") or _depth > 4:
        return None
    ref = model_uri[len("models:/"):].strip("/")
    if ref.startswith("m-") and "/" not in ref and "@" not in ref:
        return ref
    client = client or mlflow.MlflowClient()
    if "@" in ref:
        name, alias = ref.rsplit("@", 1)
        mv = client.get_model_version_by_alias(name, alias)
    elif "/" in ref:
        name, version = ref.rsplit("/", 1)
        mv = client.get_model_version(name, version)
    else:
        return None
    return _version_model_id(client, mv, _depth + 1)


def _version_model_id(client, mv, depth: int = 0) -> str | None:
    # OSS MLflow 3.x leaves ModelVersion.model_id empty; the source is ``models:/m-...``
    return getattr(mv, "model_id", None) or logged_model_id(mv.source or "", client=client, _depth=depth)


def version_metrics(client, mv) -> dict[str, float]:
    """Metrics of a model version: its logged model's (the latest value per key, MLflow 3).

    Versions registered by older pxpo have none there; for them the version
    tags ``metric.<name>`` and then the metrics of the source run are used.
    """
    out: dict[str, float] = {}
    model_id = _version_model_id(client, mv)
    if model_id:
        try:
            lm = client.get_logged_model(model_id)
        except Exception:  # noqa: BLE001 (deleted, or in another store)
            lm = None
        for m in sorted((lm.metrics or []) if lm else [], key=lambda m: (m.step, m.timestamp)):
            out[m.key] = float(m.value)
    if out:
        return out
    out = {k[len("metric."):]: float(v) for k, v in (mv.tags or {}).items() if k.startswith("metric.")}
    if not out and mv.run_id:
        try:
            out = dict(client.get_run(mv.run_id).data.metrics)
        except Exception:  # noqa: BLE001 (run deleted or in another store)
            pass
    return out


def _attach_metrics(client, model_uri: str, metrics: dict[str, float]) -> None:
    """Log the ``metrics`` its logged model lacks to it (to its source run), so a later gate can read them."""
    from mlflow.entities import Metric

    model_id = logged_model_id(model_uri, client=client)
    if not model_id:
        return
    lm = client.get_logged_model(model_id)
    have = {m.key for m in lm.metrics or []}
    missing = {k: v for k, v in metrics.items() if k not in have and math.isfinite(v)}  # NaN: see log_policy_model
    if missing and lm.source_run_id:
        now = int(time.time() * 1000)
        client.log_batch(lm.source_run_id, metrics=[Metric(k, v, now, 0, model_id=model_id, run_id=lm.source_run_id)
                                                     for k, v in missing.items()])


def find_version(registered_name: str, source_hash: str, *, client=None) -> str | None:
    """The (oldest) version of ``registered_name`` tagged ``pxpo.source_hash=source_hash``, or None.

    Lets a caller skip logging a model that is already registered.
    """
    import mlflow

    client = client or mlflow.MlflowClient()
    quoted = source_hash.replace("'", "\\'")
    found = client.search_model_versions(f"name = '{registered_name}' and tag.`pxpo.source_hash` = '{quoted}'")
    versions = [int(mv.version) for mv in found if mv.tags.get("pxpo.source_hash") == source_hash]
    return str(min(versions)) if versions else None


def _ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as e:
        if getattr(e, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
            raise
        try:
            client.create_registered_model(name, description="pxpo policies (RL fine-tuned diffusion models)")
        except MlflowException as e2:  # created concurrently
            if getattr(e2, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
                raise


def register_policy(model_uri: str, registered_name: str, *, metrics: dict, primary_metric: str, higher_is_better: bool = True,
                    margin: float = 0.0, validations_passed: bool, source_hash: str, tracking_uri: str | None = None,
                    failed_gates: dict[str, str] | None = None, field_prefix: str = "", metrics_source: str = "the metrics") -> dict:
    """Register (or reuse) a model version, alias it ``challenger``, promote to ``champion`` if it passes.

    Gate: ``validations_passed`` and (no champion, or ``metrics[primary_metric]``
    beats the champion's by more than ``margin`` in the direction of
    ``higher_is_better``). The champion's value is read from its logged model's
    metrics (:func:`version_metrics`); numeric ``metrics`` the challenger's
    logged model lacks are logged to it first. Idempotent: a version of
    ``registered_name`` tagged with the same ``pxpo.source_hash`` is reused (no
    new version) and the gate re-evaluated the same way; a version that
    already is champion stays champion.

    The comparison fails closed (:func:`pxpo.mlflow.gates.champion_gate`): a
    challenger metric that is NaN, infinite or not a number is never promoted,
    nor is one compared with a champion whose metric is missing or NaN.

    Args:
        failed_gates: the caller's own gates that failed, ``{gate: phrase}``
            (e.g. ``{"register.max_drift": "drift_pixel_l1 0.4000 > register.max_drift 0.3"}``);
            their phrases replace the generic "validation did not pass". Any
            entry refuses promotion.
        field_prefix: prefixed to ``margin`` and ``primary_metric`` in messages
            (``"register."``: the config fields).
        metrics_source: where ``metrics`` came from, named when its
            ``primary_metric`` is unusable (e.g. the metrics file).

    Returns:
        ``{version, promoted, reason, failed_gates, champion_version,
        champion_metric, challenger_metric, previous_champion_version,
        previous_champion_metric, reused_version, primary_metric}``;
        ``champion_*`` describe the champion after the decision,
        ``previous_champion_*`` the one compared against. A refusal's
        ``reason`` names only the gates that failed (``failed_gates``: their
        names), one phrase each, joined by "; ".
    """
    import mlflow

    if primary_metric not in metrics:
        raise PxpoInputError("primary_metric", f"{primary_metric!r} is not in the metrics", f"use one of {sorted(metrics)}")
    raw = metrics[primary_metric]
    challenger_metric = float(raw) if isinstance(raw, (int, float)) and not isinstance(raw, bool) else raw
    failures = dict(failed_gates or {})
    if not validations_passed and not failures:
        failures["validation"] = "validation did not pass"
    gates_passed = not failures
    client = mlflow.MlflowClient(tracking_uri) if tracking_uri else mlflow.MlflowClient()
    _ensure_registered_model(client, registered_name)
    existing = find_version(registered_name, source_hash, client=client)
    if existing is not None:
        version, reused = existing, True
    else:
        _attach_metrics(client, model_uri, _numeric(metrics))
        mv = mlflow.register_model(model_uri, registered_name, tags={"pxpo.source_hash": source_hash, "pxpo.version": __version__})
        version, reused = str(mv.version), False
    client.set_model_version_tag(registered_name, version, "validation", "passed" if gates_passed else "failed")
    client.set_registered_model_alias(registered_name, ALIAS_CHALLENGER, version)

    # the registered model's alias map; get_model_version_by_alias raises INVALID_PARAMETER_VALUE
    # (not RESOURCE_DOES_NOT_EXIST) for a missing alias
    champ_alias = client.get_registered_model(registered_name).aliases.get(ALIAS_CHAMPION)
    champ = client.get_model_version(registered_name, str(champ_alias)) if champ_alias is not None else None
    champ_version = str(champ.version) if champ is not None else None
    champ_metric = version_metrics(client, champ).get(primary_metric) if champ is not None else None

    # the comparison with the champion runs whatever the caller's gates said: a refusal names every gate that failed
    failed, kept = champion_gate(challenger_metric, champ_metric, version=version, champion_version=champ_version,
                                 primary_metric=primary_metric, higher_is_better=higher_is_better, margin=margin,
                                 field_prefix=field_prefix, source=metrics_source)
    if failed:
        failures[failed] = kept
    promoted = not failures
    reason = kept if promoted else "; ".join(failures.values())
    if promoted:
        client.set_registered_model_alias(registered_name, ALIAS_CHAMPION, version)
    client.set_model_version_tag(registered_name, version, "pxpo.gate", (("promoted: " if promoted else "not promoted: ") + reason)[:5000])
    return {
        "version": version,
        "reused_version": reused,
        "promoted": promoted,
        "reason": reason,
        "failed_gates": list(failures),
        "champion_version": version if promoted else champ_version,
        "champion_metric": challenger_metric if promoted else champ_metric,
        "challenger_metric": challenger_metric,
        "previous_champion_version": champ_version,
        "previous_champion_metric": champ_metric,
        "primary_metric": primary_metric,
    }


def load_registered_pipeline(model_uri: str, device: str = "cpu", dtype: str = "float32"):
    """A diffusers pipeline (base + policy) from a logged or registered model.

    ``model_uri``: e.g. ``models:/pxpo-digits@champion``, ``models:/pxpo-digits/3``
    or the ``models:/m-...`` URI :func:`log_policy_model` returned.
    ``device`` ``"auto"`` picks CUDA when present; ``dtype`` as in ``model.dtype``.
    """
    import mlflow.pyfunc

    if not isinstance(dtype, str):  # a torch.dtype
        dtype = str(dtype).removeprefix("torch.")
    model = mlflow.pyfunc.load_model(model_uri, model_config={"device": device, "dtype": dtype})
    return model.unwrap_python_model().pipe
