"""Great Expectations suites for the data between stages (an adapter at the edge).

Suites: the prompt dataset (schema, non-empty, lengths, duplicates, held-out
split size), trajectories (finite, shapes, one per sample) and reward maps
(finite, range, shapes, one map per sample). Tensors are summarised into one
row per sample so that a failure names the sample.

A failed suite stops its stage: :func:`check` saves the full result as JSON and
raises :class:`ValidationFailed` (a :class:`PxpoInputError`, exit code 2) with
a summary naming each failed expectation and the offending rows.

Great Expectations is imported lazily (about 6 s), only by validating stages.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import PxpoInputError

_CTX = None
_N = 0


@dataclass
class Failure:
    expectation: str
    column: str | None
    description: str
    unexpected_rows: list = field(default_factory=list)
    unexpected_values: list = field(default_factory=list)
    observed: object = None


@dataclass
class ValidationReport:
    suite: str
    success: bool
    evaluated: int
    failures: list[Failure]
    ge_result: dict = field(default_factory=dict, repr=False)

    def summary(self) -> str:
        if self.success:
            return f"suite {self.suite!r} passed {self.evaluated} expectations"
        lines = [f"suite {self.suite!r} failed {len(self.failures)} of {self.evaluated} expectations:"]
        for f in self.failures:
            where = f" on {f.column!r}" if f.column else ""
            detail = ""
            if f.unexpected_rows:
                detail = f": rows {f.unexpected_rows[:20]} values {f.unexpected_values[:20]}"
            elif f.observed is not None:
                detail = f": observed {f.observed}"
            lines.append(f"  - {f.description} ({f.expectation}{where}){detail}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "suite": self.suite,
            "success": self.success,
            "evaluated": self.evaluated,
            "failures": [asdict(f) for f in self.failures],
            "summary": self.summary(),
            "ge_result": self.ge_result,
        }

    def save(self, path: Path) -> None:
        from .storage import write_json

        write_json(Path(path), json.loads(json.dumps(self.to_dict(), default=str)))


class ValidationFailed(PxpoInputError):
    """A suite failed; ``report`` holds the details."""

    def __init__(self, report: ValidationReport, saved_to: Path | None):
        self.report = report
        where = f" (the full result is in {saved_to})" if saved_to else ""
        super().__init__(f"validation suite {report.suite!r}", "\n" + report.summary(), f"fix the listed rows or inputs{where}")


def _context():
    global _CTX
    if _CTX is None:
        os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        _CTX = gx.get_context(mode="ephemeral")
        _CTX.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    return _CTX


def _timed_ge(fn):
    """Record the suite's wall time (GE import included) as orchestration cost ("ge")."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .timing import timed

        with timed("ge"):
            return fn(*args, **kwargs)

    return wrapper


def run_suite(name: str, df, expectations: list) -> ValidationReport:
    """Validate DataFrame ``df`` against ``expectations`` (GE expectation objects whose
    ``meta["description"]`` is a human sentence)."""
    global _N
    import great_expectations as gx

    ctx = _context()
    _N += 1
    ds = ctx.data_sources.add_pandas(name=f"pxpo_{name}_{_N}")
    batch = ds.add_dataframe_asset(name=name).add_batch_definition_whole_dataframe("all").get_batch(batch_parameters={"dataframe": df})
    suite = gx.ExpectationSuite(name=f"{name}_{_N}")
    for e in expectations:
        suite.add_expectation(e)
    result = batch.validate(suite, result_format="COMPLETE")
    failures = []
    for r in result.results:
        if r.success:
            continue
        cfg = r.expectation_config
        res = r.result or {}
        failures.append(
            Failure(
                expectation=cfg.type,
                column=cfg.kwargs.get("column"),
                description=(cfg.meta or {}).get("description", cfg.type),
                unexpected_rows=[int(i) for i in (res.get("unexpected_index_list") or [])][:20],
                unexpected_values=list(res.get("partial_unexpected_list") or [])[:20],
                observed=res.get("observed_value"),
            )
        )
    return ValidationReport(
        suite=name, success=bool(result.success), evaluated=len(result.results), failures=failures, ge_result=result.to_json_dict()
    )


@_timed_ge
def validate_prompts(df, *, min_length=1, max_length=300, min_heldout=1, max_heldout_fraction=0.5) -> ValidationReport:
    """Prompt dataset: columns prompt, weight, split (one row per prompt)."""
    import great_expectations as gx
    import pandas as pd

    E = gx.expectations
    cols = ["prompt", "weight", "split"]
    missing = [c for c in cols if c not in df.columns]
    if missing:
        return ValidationReport("prompts", False, 1, [Failure("expect_table_columns_to_match_set", None, f"columns {missing} are required", observed=list(df.columns))])
    d = df.copy()
    d["prompt"] = d["prompt"].map(lambda p: p.strip() if isinstance(p, str) else p)
    d["prompt_norm"] = d["prompt"].map(lambda p: " ".join(p.split()).casefold() if isinstance(p, str) else p)
    n = len(d)
    heldout = int((d["split"] == "heldout").sum())
    d["heldout_count"] = heldout
    d["heldout_fraction"] = heldout / n if n else 0.0
    d["train_count"] = int((d["split"] == "train").sum())
    d = d.reset_index(drop=True)
    ex = [
        E.ExpectTableRowCountToBeBetween(min_value=1, meta={"description": "the dataset must not be empty"}),
        E.ExpectColumnValuesToNotBeNull(column="prompt", meta={"description": "every row needs a prompt"}),
        E.ExpectColumnValueLengthsToBeBetween(
            column="prompt", min_value=min_length, max_value=max_length, meta={"description": f"prompt length must be {min_length}-{max_length} characters"}
        ),
        E.ExpectColumnValuesToBeUnique(column="prompt_norm", meta={"description": "prompts must be unique (ignoring case and whitespace)"}),
        E.ExpectColumnValuesToNotBeNull(column="weight", meta={"description": "weights must be numbers"}),
        E.ExpectColumnValuesToBeBetween(column="weight", min_value=0, strict_min=True, meta={"description": "weights must be > 0"}),
        E.ExpectColumnValuesToBeInSet(column="split", value_set=["train", "heldout"], meta={"description": "split must be train or heldout"}),
    ]
    if n:
        ex += [
            E.ExpectColumnMinToBeBetween(column="heldout_count", min_value=min_heldout, meta={"description": f"at least {min_heldout} held-out prompt(s)"}),
            E.ExpectColumnMaxToBeBetween(
                column="heldout_fraction", max_value=max_heldout_fraction, meta={"description": f"at most {max_heldout_fraction:.0%} of prompts held out"}
            ),
            E.ExpectColumnMinToBeBetween(column="train_count", min_value=1, meta={"description": "at least one training prompt"}),
        ]
    del pd
    return run_suite("prompts", d, ex)


def _per_sample(t) -> "object":
    import numpy as np
    import torch

    if isinstance(t, torch.Tensor):
        t = t.detach().cpu().float().numpy()
    return np.asarray(t, dtype=np.float64)


@_timed_ge
def validate_reward_maps(maps, *, num_samples: int, height: int, width: int, value_range=None) -> ValidationReport:
    """Reward maps (N, H, W): one finite map of the image size per sample (optionally in range)."""
    import great_expectations as gx
    import numpy as np
    import pandas as pd

    E = gx.expectations
    a = _per_sample(maps)
    if a.ndim != 3:
        return ValidationReport("reward_maps", False, 1, [Failure("shape", None, "reward maps must be (N, H, W)", observed=list(a.shape))])
    fin = np.isfinite(a)
    safe = np.where(fin, a, np.nan)
    df = pd.DataFrame(
        {
            "sample": np.arange(a.shape[0]),
            "height": a.shape[1],
            "width": a.shape[2],
            "n_nonfinite": (~fin).reshape(a.shape[0], -1).sum(1),
            "min": np.nanmin(safe.reshape(a.shape[0], -1), 1, initial=np.inf, where=fin.reshape(a.shape[0], -1)),
            "max": np.nanmax(safe.reshape(a.shape[0], -1), 1, initial=-np.inf, where=fin.reshape(a.shape[0], -1)),
        }
    )
    ex = [
        E.ExpectTableRowCountToEqual(value=num_samples, meta={"description": f"one map per sample ({num_samples})"}),
        E.ExpectColumnValuesToBeBetween(column="height", min_value=height, max_value=height, meta={"description": f"map height must be {height}"}),
        E.ExpectColumnValuesToBeBetween(column="width", min_value=width, max_value=width, meta={"description": f"map width must be {width}"}),
        E.ExpectColumnValuesToBeBetween(column="n_nonfinite", max_value=0, meta={"description": "maps must be finite (no NaN/inf)"}),
    ]
    if value_range is not None:
        lo, hi = value_range
        ex += [
            E.ExpectColumnValuesToBeBetween(column="min", min_value=lo, meta={"description": f"values must be >= {lo}"}),
            E.ExpectColumnValuesToBeBetween(column="max", max_value=hi, meta={"description": f"values must be <= {hi}"}),
        ]
    return run_suite("reward_maps", df, ex)


@_timed_ge
def validate_trajectories(latents, log_probs, timesteps, num_samples: int | None = None) -> ValidationReport:
    """Trajectories: latents (N, T+1, ...), log_probs (N, T, ...), timesteps (T,), all finite."""
    import great_expectations as gx
    import numpy as np
    import pandas as pd

    E = gx.expectations
    lat, lp = _per_sample(latents), _per_sample(log_probs)
    t = len(_per_sample(timesteps))
    df = pd.DataFrame(
        {
            "sample": np.arange(lat.shape[0]),
            "steps": lat.shape[1],
            "logp_steps": lp.shape[1] if lp.shape[0] == lat.shape[0] else -1,
            "latent_nonfinite": (~np.isfinite(lat)).reshape(lat.shape[0], -1).sum(1),
            "logp_nonfinite": (~np.isfinite(lp)).reshape(lp.shape[0], -1).sum(1) if lp.shape[0] == lat.shape[0] else -1,
        }
    )
    ex = [
        E.ExpectColumnValuesToBeBetween(column="steps", min_value=t + 1, max_value=t + 1, meta={"description": f"T+1 = {t + 1} latents per sample"}),
        E.ExpectColumnValuesToBeBetween(column="logp_steps", min_value=t, max_value=t, meta={"description": f"T = {t} log-probs per sample"}),
        E.ExpectColumnValuesToBeBetween(column="latent_nonfinite", min_value=0, max_value=0, meta={"description": "latents must be finite"}),
        E.ExpectColumnValuesToBeBetween(column="logp_nonfinite", min_value=0, max_value=0, meta={"description": "log-probs must be finite"}),
    ]
    if num_samples is not None:
        ex.append(E.ExpectTableRowCountToEqual(value=num_samples, meta={"description": f"{num_samples} trajectories"}))
    return run_suite("trajectories", df, ex)


def check(report: ValidationReport, save_to: Path | None) -> None:
    """Save the report (if ``save_to``), then raise :class:`ValidationFailed` if it failed."""
    if save_to is not None:
        report.save(Path(save_to))
    if not report.success:
        raise ValidationFailed(report, save_to)
