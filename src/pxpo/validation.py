"""Great Expectations suites for the data between stages (an adapter at the edge).

Suites: the prompt dataset (schema, non-empty, lengths, duplicates, held-out
split size), trajectories (finite, shapes, one per sample) and reward maps
(finite, range, shapes, one map per sample). Tensors are summarised into one
row per sample so that a failure names the sample.

A failed suite stops its stage: :func:`check` saves the full result as JSON and
raises :class:`ValidationFailed` (a :class:`PxpoInputError`, exit code 2) with
a summary naming each failed expectation and the offending rows.

Great Expectations is imported lazily (about 5 s), only by validating stages.
A stage that will validate calls :func:`start_worker` first: GE is then
imported in a separate (spawned) process while the stage loads its model and
computes, and the suite runs there; the stage only pickles a small per-sample
DataFrame across. ``PXPO_GE_WORKER=0`` validates in-process instead.
Expectations are plain specs ``(class name, kwargs)`` so that building them
needs no GE import.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import PxpoInputError

_CTX = None
_N = 0
_POOL = None  # the GE worker process (concurrent.futures.ProcessPoolExecutor), if started


def _spec(expectation: str, description: str, **kwargs) -> tuple[str, dict]:
    """An expectation as data: GE class name and kwargs (``meta.description`` is the human sentence)."""
    return expectation, {**kwargs, "meta": {"description": description}}


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


def _warm() -> int:
    _context()
    return os.getpid()


def start_worker() -> None:
    """Import Great Expectations in a spawned worker process now, in parallel with the caller.

    Idempotent; does nothing when ``PXPO_GE_WORKER=0``. Later suites run in
    that worker. A spawned (not forked) process: safe whatever threads torch
    has started in the caller.
    """
    global _POOL
    if _POOL is not None or os.environ.get("PXPO_GE_WORKER", "1") == "0":
        return
    import atexit
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    _POOL = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
    _POOL.submit(_warm)
    atexit.register(stop_worker)


def stop_worker() -> None:
    """Shut the worker down (it is restarted by the next :func:`start_worker`)."""
    global _POOL
    pool, _POOL = _POOL, None
    if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)


def _timed_ge(fn):
    """Record the suite's wall time (GE import included) as orchestration cost ("ge")."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .timing import timed

        with timed("ge"):
            return fn(*args, **kwargs)

    return wrapper


def run_suite(name: str, df, expectations: list[tuple[str, dict]]) -> ValidationReport:
    """Validate DataFrame ``df`` against expectation specs (:func:`_spec`).

    Runs in the GE worker when one was started (:func:`start_worker`), else here.
    """
    if _POOL is not None:
        from concurrent.futures.process import BrokenProcessPool

        try:
            return _POOL.submit(_run_suite_here, name, df, expectations).result()
        except BrokenProcessPool:  # the worker died (e.g. killed for memory): validate here
            stop_worker()
    return _run_suite_here(name, df, expectations)


def _run_suite_here(name: str, df, expectations: list[tuple[str, dict]]) -> ValidationReport:
    global _N
    import great_expectations as gx

    ctx = _context()
    _N += 1
    ds = ctx.data_sources.add_pandas(name=f"pxpo_{name}_{_N}")
    batch = ds.add_dataframe_asset(name=name).add_batch_definition_whole_dataframe("all").get_batch(batch_parameters={"dataframe": df})
    suite = gx.ExpectationSuite(name=f"{name}_{_N}")
    for cls, kwargs in expectations:
        suite.add_expectation(getattr(gx.expectations, cls)(**kwargs))
    result = batch.validate(suite, result_format="COMPLETE")
    failures = []
    for r in result.results:
        if r.success:
            continue
        cfg = r.expectation_config
        res = r.result or {}
        mismatched = dict((res.get("details") or {}).get("mismatched") or {})
        if cfg.kwargs.get("exact_match") is False:  # a subset check: only missing columns fail it
            mismatched.pop("unexpected", None)
        failures.append(
            Failure(
                expectation=cfg.type,
                column=cfg.kwargs.get("column"),
                description=(cfg.meta or {}).get("description", cfg.type),
                unexpected_rows=[int(i) for i in (res.get("unexpected_index_list") or [])][:20],
                unexpected_values=list(res.get("partial_unexpected_list") or [])[:20],
                # ExpectTableColumnsToMatchSet: the missing (/unexpected) columns, not every column
                observed=mismatched or res.get("observed_value"),
            )
        )
    return ValidationReport(
        suite=name, success=bool(result.success), evaluated=len(result.results), failures=failures,
        ge_result=json.loads(json.dumps(result.to_json_dict(), default=str)),
    )


PROMPT_COLUMNS = ("prompt", "weight", "split")


@_timed_ge
def validate_prompts(df, *, min_length=1, max_length=300, min_heldout=1, max_heldout_fraction=0.5) -> ValidationReport:
    """Prompt dataset: columns prompt, weight, split (one row per prompt; other columns are allowed).

    The schema is checked by GE's table expectations (``ExpectTableColumnsToMatchSet``
    for the set, ``ExpectColumnToExist`` per column, so a failure names each missing
    column); the row expectations of a missing column are left out, not errored.
    """
    cols = list(PROMPT_COLUMNS)
    have = set(df.columns)
    d = df.reset_index(drop=True)  # a new frame: the derived columns below never touch the caller's
    n = len(d)
    ex = [
        _spec("ExpectTableColumnsToMatchSet", f"columns {cols} are required", column_set=cols, exact_match=False),
        *(_spec("ExpectColumnToExist", f"column {c!r} is required", column=c) for c in cols),
        _spec("ExpectTableRowCountToBeBetween", "the dataset must not be empty", min_value=1),
    ]
    if "prompt" in have:
        d["prompt"] = d["prompt"].map(lambda p: p.strip() if isinstance(p, str) else p)
        d["prompt_norm"] = d["prompt"].map(lambda p: " ".join(p.split()).casefold() if isinstance(p, str) else p)
        ex += [
            _spec("ExpectColumnValuesToNotBeNull", "every row needs a prompt", column="prompt"),
            _spec("ExpectColumnValueLengthsToBeBetween", f"prompt length must be {min_length}-{max_length} characters", column="prompt", min_value=min_length, max_value=max_length),
            _spec("ExpectColumnValuesToBeUnique", "prompts must be unique (ignoring case and whitespace)", column="prompt_norm"),
        ]
    if "weight" in have:
        ex += [
            _spec("ExpectColumnValuesToNotBeNull", "weights must be numbers", column="weight"),
            _spec("ExpectColumnValuesToBeBetween", "weights must be > 0", column="weight", min_value=0, strict_min=True),
        ]
    if "split" in have:
        heldout = int((d["split"] == "heldout").sum())
        d["heldout_count"] = heldout
        d["heldout_fraction"] = heldout / n if n else 0.0
        d["train_count"] = int((d["split"] == "train").sum())
        ex.append(_spec("ExpectColumnValuesToBeInSet", "split must be train or heldout", column="split", value_set=["train", "heldout"]))
        if n:
            ex += [
                _spec("ExpectColumnMinToBeBetween", f"at least {min_heldout} held-out prompt(s)", column="heldout_count", min_value=min_heldout),
                _spec("ExpectColumnMaxToBeBetween", f"at most {max_heldout_fraction:.0%} of prompts held out", column="heldout_fraction", max_value=max_heldout_fraction),
                _spec("ExpectColumnMinToBeBetween", "at least one training prompt", column="train_count", min_value=1),
            ]
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
    import numpy as np
    import pandas as pd

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
        _spec("ExpectTableRowCountToEqual", f"one map per sample ({num_samples})", value=num_samples),
        _spec("ExpectColumnValuesToBeBetween", f"map height must be {height}", column="height", min_value=height, max_value=height),
        _spec("ExpectColumnValuesToBeBetween", f"map width must be {width}", column="width", min_value=width, max_value=width),
        _spec("ExpectColumnValuesToBeBetween", "maps must be finite (no NaN/inf)", column="n_nonfinite", max_value=0),
    ]
    if value_range is not None:
        lo, hi = value_range
        ex += [
            _spec("ExpectColumnValuesToBeBetween", f"values must be >= {lo}", column="min", min_value=lo),
            _spec("ExpectColumnValuesToBeBetween", f"values must be <= {hi}", column="max", max_value=hi),
        ]
    return run_suite("reward_maps", df, ex)


@_timed_ge
def validate_trajectories(latents, log_probs, timesteps, num_samples: int | None = None) -> ValidationReport:
    """Trajectories: latents (N, T+1, ...), log_probs (N, T, ...), timesteps (T,), all finite."""
    import numpy as np
    import pandas as pd

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
        _spec("ExpectColumnValuesToBeBetween", f"T+1 = {t + 1} latents per sample", column="steps", min_value=t + 1, max_value=t + 1),
        _spec("ExpectColumnValuesToBeBetween", f"T = {t} log-probs per sample", column="logp_steps", min_value=t, max_value=t),
        _spec("ExpectColumnValuesToBeBetween", "latents must be finite", column="latent_nonfinite", min_value=0, max_value=0),
        _spec("ExpectColumnValuesToBeBetween", "log-probs must be finite", column="logp_nonfinite", min_value=0, max_value=0),
    ]
    if num_samples is not None:
        ex.append(_spec("ExpectTableRowCountToEqual", f"{num_samples} trajectories", value=num_samples))
    return run_suite("trajectories", df, ex)


def check(report: ValidationReport, save_to: Path | None) -> None:
    """Save the report (if ``save_to``), then raise :class:`ValidationFailed` if it failed."""
    if save_to is not None:
        report.save(Path(save_to))
    if not report.success:
        raise ValidationFailed(report, save_to)
