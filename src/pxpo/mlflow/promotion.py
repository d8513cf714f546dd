"""The register stage: one MLflow run, a model version as ``challenger``, a gated ``champion``.

Gate (all must hold to promote):

* every validation report given passed (Great Expectations suites of the
  prompt dataset and the reward maps);
* the policy beats its own base model on held-out prompts by more than
  ``register.min_gain`` (``reward_gain`` of the evaluation);
* it beats the current champion's ``register.primary_metric`` by more than
  ``register.margin`` (or there is no champion yet);
* its drift from the base model (``drift_pixel_l1`` of the evaluation) is at
  most ``register.max_drift``, when that is set (a reward-hacking alarm:
  a policy that maximises the proxy by leaving the base model's images far
  behind is not promoted);
* no gold reward (``evaluate.gold``: labellers training never sees, such as
  prompt fidelity on the embedded default) of the policy is lower than the
  base model's by more than ``register.max_gold_drop``, when that is set:
  the training reward can rise while what it stood for falls (reward
  hacking); the decision names the gold reward that fell and by how much.

Every comparison fails closed (:func:`pxpo.mlflow.gates.passes`): a value
that is missing, NaN, infinite or not a number fails its gate, with a message
naming the metric, the file it came from and the threshold's config field. A
refused challenger's ``reason`` names only the gates that failed, one phrase
each (``failed_gates``: their config fields, or ``validation``).

Idempotent: the model version is keyed by a hash of the policy weights and
the evaluation, so re-running the stage reuses the version and repeats the
same decision.

The run records: the config (params), MLflow's git source tags and the DVC /
KFP provenance tags (:func:`pxpo.mlflow.tracking.standard_tags`), the prompt
dataset as dataset inputs (:mod:`pxpo.mlflow.datasets`), per-epoch training
metrics (``train.<metric>``), the training loop's images as image series at
their epochs (``train.probe_samples``, ``train.reward_map_mean``: the policy's
``images/<name>/step_XXXX.png``), the evaluation metrics (also on the logged
model), and the evaluation images.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

from ..errors import PxpoInputError
from .gates import check_number, passes


def _hash_dir(d: Path, h) -> None:
    for f in sorted(p for p in d.rglob("*") if p.is_file()):
        if f.name.endswith((".safetensors", ".json", ".bin")) and "state" not in f.relative_to(d).parts:
            h.update(str(f.relative_to(d)).encode())
            h.update(f.read_bytes())


def source_hash(policy_dir: Path, eval_dir: Path) -> str:
    """sha256 over the policy's weights/configs and the evaluation metrics."""
    h = hashlib.sha256()
    _hash_dir(policy_dir / "lora", h) if (policy_dir / "lora").is_dir() else _hash_dir(policy_dir / "model", h)
    h.update((eval_dir / "metrics.json").read_bytes())
    return h.hexdigest()


def read_validation_reports(paths: list[Path]) -> tuple[bool, list[str]]:
    """(all passed, names of failed or unreadable reports).

    A report passes only when it is a JSON object whose ``success`` is ``true``
    (not merely truthy: ``"false"`` is a string).
    """
    failed = []
    for p in paths:
        try:
            report = json.loads(Path(p).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            report = None
        ok = isinstance(report, dict) and report.get("success") is True
        if not ok:
            failed.append(str(p))
    return not failed, failed


def gold_checks(metrics: dict, max_drop: float | None, where: str = "metrics.json") -> list[tuple[bool, str]]:
    """``(passed, text)`` per gold reward of an evaluation's ``metrics`` (its ``gold`` = {key: {base, policy}}).

    With ``max_drop`` set a gold reward passes when its drop (base - policy) is
    at most ``max_drop``; a base or policy value that is missing, NaN, infinite
    or not a number fails (:func:`pxpo.mlflow.gates.passes`). With ``max_drop``
    None every one passes and the text only reports it.
    """
    gold = metrics.get("gold") or {}
    if max_drop is not None and not gold:
        raise PxpoInputError(where, "no gold rewards, which register.max_gold_drop needs",
                             "set evaluate.gold (e.g. [{name: digit_fidelity}]) and re-run `pxpo evaluate`, or unset register.max_gold_drop")
    if not isinstance(gold, dict):
        text = f"gold is {type(gold).__name__} in {where}, not {{name: {{base, policy}}}}"
        return [(max_drop is None, text if max_drop is None else f"{text}: register.max_gold_drop {max_drop} fails closed")]
    out = []
    for key, v in gold.items():
        v = v if isinstance(v, dict) else {}
        (base, bad_base), (policy, bad_policy) = (check_number(v.get(side), f"gold {key} {side}", f"{where} (gold.{key}.{side})")
                                                  for side in ("base", "policy"))
        if bad_base or bad_policy:
            problems = "; ".join(p for p in (bad_base, bad_policy) if p)
            out.append((max_drop is None, problems if max_drop is None else f"{problems}: register.max_gold_drop {max_drop} fails closed"))
            continue
        text = f"gold {key} {base:.4f} (base) -> {policy:.4f} (policy), drop"
        if max_drop is None:
            out.append((True, f"{text} {base - policy:+.4f}"))
        else:
            out.append(passes(base - policy, "<=", max_drop, text, limit_name="register.max_gold_drop", source=where, fmt="+.4f"))
    return out


def gold_gate(metrics: dict, max_drop: float | None, where: str = "metrics.json") -> tuple[bool, str]:
    """(passed, summary) of the gold gate on an evaluation's ``metrics`` (its ``gold`` = {key: {base, policy}}).

    Passes when ``max_drop`` is None or every gold reward's drop (base - policy)
    is at most ``max_drop`` (:func:`gold_checks`: a NaN or missing value fails).
    The summary names each gold reward, its two values and its drop, the
    failing ones first.
    """
    return _gold_summary(gold_checks(metrics, max_drop, where))


def _gold_summary(checks: list[tuple[bool, str]]) -> tuple[bool, str]:
    return all(ok for ok, _ in checks), "; ".join([t for ok, t in checks if not ok] + [t for ok, t in checks if ok])


def gate_and_register(cfg, *, policy_dir: Path, eval_dir: Path, tracking_uri: str, validation_reports: list[Path],
                      out: Path | None, prompts: str | Path | None = None) -> dict:
    """Log the run and the model, register it as challenger, promote if the gate passes.

    ``prompts``: the prompt dataset the policy was trained on (a ``pxpo prepare``
    directory, a prompt file or ``digits``), logged as the run's dataset
    inputs; default ``cfg.prompts.source``.
    """
    from ..timing import timed

    with timed("mlflow"):
        return _gate_and_register(cfg, policy_dir=policy_dir, eval_dir=eval_dir, tracking_uri=tracking_uri,
                                  validation_reports=validation_reports, out=out,
                                  prompts=str(prompts) if prompts is not None else cfg.prompts.source)


def run_summary(history: list[dict], metrics: dict) -> dict:
    """What the decision is about, for the pipeline's last lines: the trained reward (first and last epoch of
    ``history``, the policy's metrics.jsonl), the held-out reward and the gold rewards of base and policy."""
    train = [h["reward_mean"] for h in history if isinstance(h.get("reward_mean"), (int, float))]
    return {
        "train_reward": [train[0], train[-1]] if train else None,
        "heldout_reward": {"base": metrics.get("base_reward_mean"), "policy": metrics.get("reward_mean")},
        "gold": metrics.get("gold", {}),
    }


def _fmt(x) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) and not isinstance(x, bool) else str(x)


def format_summary(summary: dict) -> str:
    """``summary`` (:func:`run_summary`) as one line."""
    parts = []
    if summary.get("train_reward"):
        parts.append("trained reward {:.4f} -> {:.4f} (training epochs)".format(*summary["train_reward"]))
    h = summary.get("heldout_reward") or {}
    if h.get("base") is not None and h.get("policy") is not None:
        parts.append(f"held-out {_fmt(h['base'])} (base) -> {_fmt(h['policy'])} (policy)")
    gold = summary.get("gold") or {}
    parts += [f"gold {k} {_fmt(v.get('base'))} (base) -> {_fmt(v.get('policy'))} (policy)"
              for k, v in (gold.items() if isinstance(gold, dict) else ()) if isinstance(v, dict)]
    return "; ".join(parts)


def _gate_and_register(cfg, *, policy_dir, eval_dir, tracking_uri, validation_reports, out, prompts) -> dict:
    from ..storage import write_json
    from ..tracking import image_steps
    from .datasets import log_prompt_datasets
    from .model_registry import log_policy_model, register_policy
    from .tracking import MlflowTracker, standard_tags

    metrics_file = Path(eval_dir) / "metrics.json"
    if not metrics_file.is_file():
        raise PxpoInputError(str(metrics_file), "missing", "pass the output directory of `pxpo evaluate` with --eval")
    if not ((Path(policy_dir) / "lora").is_dir() or (Path(policy_dir) / "model").is_dir()):
        raise PxpoInputError(str(policy_dir), "no lora/ or model/ in the policy directory", "pass the output of `pxpo train` or `pxpo run`")
    metrics = json.loads(metrics_file.read_text())
    r = cfg.register
    if r.primary_metric not in metrics:
        raise PxpoInputError("register.primary_metric", f"{r.primary_metric!r} is not in {metrics_file}", f"use one of {sorted(k for k, v in metrics.items() if isinstance(v, (int, float)))}")
    where = str(metrics_file)
    failures: dict[str, str] = {}  # gate -> its phrase, only for the gates that failed
    passed, failed = read_validation_reports(validation_reports)
    if not passed:
        failures["validation"] = f"validation failed: {', '.join(failed)}"
    gain_ok, gain_text = passes(metrics.get("reward_gain"), ">", r.min_gain, "reward_gain", limit_name="register.min_gain", source=where)
    if not gain_ok:
        failures["register.min_gain"] = gain_text
    if r.max_drift is not None:
        if "drift_pixel_l1" not in metrics:
            raise PxpoInputError(where, "no drift_pixel_l1, which register.max_drift needs", "re-run `pxpo evaluate` (it reports drift), or unset register.max_drift")
        drift_ok, drift_text = passes(metrics["drift_pixel_l1"], "<=", r.max_drift, "drift_pixel_l1", limit_name="register.max_drift", source=where)
        if not drift_ok:
            failures["register.max_drift"] = drift_text
    gold = gold_checks(metrics, r.max_gold_drop, where)
    gold_ok, gold_text = _gold_summary(gold)
    if not gold_ok:
        failures["register.max_gold_drop"] = "; ".join(t for ok, t in gold if not ok)

    tracker = MlflowTracker(experiment=r.experiment, tracking_uri=tracking_uri)
    with tracker.start(run_name="pxpo-register"):
        tracker.set_tags({**standard_tags(Path.cwd()), "pxpo.stage": "register", **({"pxpo.gold": gold_text} if gold_text else {})})
        tracker.log_params(cfg.to_dict())
        try:
            log_prompt_datasets(prompts)
        except PxpoInputError as e:  # lineage only: a missing prompt dataset does not block the gate
            warnings.warn(f"prompt dataset not logged as run input: {e}", stacklevel=2)
            tracker.set_tags({"pxpo.prompts.not_logged": str(e)})
        hist = Path(policy_dir) / "metrics.jsonl"
        history = [json.loads(line) for line in hist.read_text().splitlines()] if hist.is_file() else []
        if history:
            for rec in history:
                tracker.log_metrics({f"train.{k}": v for k, v in rec.items() if k != "epoch" and isinstance(v, (int, float))}, step=int(rec["epoch"]))
        for name, steps in image_steps(Path(policy_dir)).items():  # the loop's images (probe grid, mean reward map)
            for step, png in steps:
                tracker.log_image(png, f"train.{name}", step=step)
        for img in ("samples_grid.png", "reward_overlay.png", "reward_map_mean.png"):
            if (Path(eval_dir) / img).is_file():
                tracker.log_image(Path(eval_dir) / img, img)
        model_uri = log_policy_model(
            tracker.run_id,
            base_model=cfg.model.path,
            policy_dir=Path(policy_dir),
            metrics=metrics,
            revision=cfg.model.revision,
            sampler=cfg.sample.sampler,
            num_steps=cfg.sample.num_steps,
            guidance_scale=cfg.sample.guidance_scale,
            negative_prompt=cfg.prompts.negative_prompt,
        )  # logs the evaluation metrics to the run and to the logged model
        decision = register_policy(
            model_uri,
            r.model_name,
            metrics=metrics,
            primary_metric=r.primary_metric,
            higher_is_better=r.higher_is_better,
            margin=r.margin,
            validations_passed=not failures,
            failed_gates=failures,
            field_prefix="register.",
            metrics_source=where,
            source_hash=source_hash(Path(policy_dir), Path(eval_dir)),
        )
    if decision["promoted"] and gold_text:  # a refusal names only the gates that failed; a promotion also reports the gold
        decision["reason"] += f"; {gold_text}"
    decision["gold_passed"] = gold_ok
    decision["summary"] = run_summary(history, metrics)
    decision.update(model_name=r.model_name, model_uri=model_uri, tracking_uri=tracking_uri, run_id=tracker.run_id)
    if out is not None:
        write_json(Path(out), decision)
    return decision
