"""What a KFP component runs inside its container: ``pxpo <stage>`` as a child process.

Each component in the ``components`` package calls :func:`run_stage` with the
stage, the params.yaml sections that stage reads (one pipeline parameter per
section, see :data:`STAGE_SECTIONS`) and its artifact paths. The stage then
runs exactly as ``pxpo <stage>`` does from a shell or a DVC stage, in its own
process (as Kubeflow's own components run a launcher module in their image):
its output streams into the task's log, and a non-zero exit fails the task.

Nothing here imports the stage code, the pipeline or the components, so a
component's container only pays for importing the stage in the child.
"""

from __future__ import annotations

import codecs
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

# Stage -> the top-level keys of params.yaml it reads (model, prompts, sample,
# reward, train, prepare, evaluate, register, seed; ``pipeline`` is compile-time).
# The pipeline passes each task only these, so editing one section re-runs only
# the tasks that read it (and what depends on their outputs): Kubeflow's cache
# key is the task's inputs. The task loads them with ``--sections``; reading any
# other key there is an error, so an omission here fails the task loudly.
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "prepare": ("prepare",),
    "sample": ("seed", "model", "prompts", "sample"),
    "label": ("reward",),
    "train": ("seed", "model", "prompts", "sample", "reward", "train"),
    "evaluate": ("model", "prompts", "sample", "reward", "evaluate"),
    # register reads model, sample and register, and logs the whole config to MLflow as the
    # registered model's provenance: it gets every section (it is never cached anyway).
    "register": ("seed", "model", "prompts", "sample", "reward", "train", "prepare", "evaluate", "register"),
}

# Every section some task reads, in params.yaml order: the pipeline's per-section parameters.
PIPELINE_SECTIONS: tuple[str, ...] = tuple(
    s for s in ("seed", "model", "prompts", "sample", "reward", "train", "prepare", "evaluate", "register")
    if any(s in v for v in STAGE_SECTIONS.values())
)

TAIL_BYTES = 4000  # of the child's stderr, repeated in the task's error message
# After a stage succeeds, its last line of stdout (its summary) is repeated after this marker, so a
# reader of the task's log (``pxpo pipeline run --local``'s one line per task) finds it.
SUMMARY_PREFIX = "pxpo summary: "


def param_name(section: str) -> str:
    """The pipeline / component parameter carrying one params.yaml section."""
    return f"params_{section}"


def section_params(stage: str, values: Mapping[str, str]) -> dict[str, str]:
    """``{params_<section>: value}`` for the sections ``stage`` reads, picked from ``values`` (keyed by section)."""
    return {param_name(s): values[s] for s in STAGE_SECTIONS[stage]}


def params_text(params: Mapping[str, str]) -> str:
    """One params.yaml from per-section texts (each ``section: value`` YAML, as ``section_yaml`` writes it).

    Raises ValueError if a text is not a mapping holding just its own section.
    """
    data: dict = {}
    for section, text in params.items():
        value = yaml.safe_load(text) if text else None
        if value is None:  # an empty parameter: the section's defaults
            continue
        if not isinstance(value, dict) or set(value) != {section}:
            raise ValueError(f"params_{section} must be YAML of the form '{section}: ...', got {text[:200]!r}")
        data.update(value)
    return yaml.safe_dump(data, sort_keys=False)


def stage_command(
    stage: Sequence[str],
    args: Sequence[str] = (),
    *,
    params_file: str | None = None,
    sections: Sequence[str] | None = None,
    overrides: Sequence[str] = (),
    launcher: Sequence[str] | None = None,
) -> list[str]:
    """The child's argv: ``[*launcher, -m, pxpo.cli, *stage, --quiet, --params F, --sections a,b, *args, --, *overrides]``.

    ``launcher`` defaults to this interpreter; a multi-process launcher such as
    ``["accelerate", "launch", "--num_processes", "4"]`` runs the same module
    once per GPU (``accelerate launch -m pxpo.cli ...``).
    """
    cmd = [*(launcher or [sys.executable]), "-m", "pxpo.cli", *stage, "--quiet"]
    if params_file is not None:
        cmd += ["--params", params_file]
        if sections is not None:
            cmd += ["--sections", ",".join(sections)]
    # "--" ends the options, so a list option last in ``args`` (register's --validation) cannot swallow the overrides
    return [*cmd, *args, *(["--", *overrides] if overrides else [])]


def _pump(src, dst, tail: deque | None) -> None:
    """Copy a child's pipe to ``dst`` (a text stream) as it arrives; keep the last bytes in ``tail``."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    while True:
        chunk = os.read(src.fileno(), 65536)
        if not chunk:
            break
        if tail is not None:
            tail.extend(chunk)
        try:
            dst.write(decoder.decode(chunk))
            dst.flush()
        except (OSError, ValueError):  # our stream went away: keep draining so the child never blocks
            pass
    src.close()


def run_command(cmd: Sequence[str], *, env: Mapping[str, str] | None = None, what: str | None = None) -> None:
    """Run ``cmd`` as a child process, stream its stdout/stderr to ours, raise RuntimeError on a non-zero exit.

    The error names ``what`` (default: the command), the exit code (or the
    signal) and ends with the last lines the child wrote to stderr, so the
    task's failure message says why without opening its log.
    """
    what = what or " ".join(cmd)
    child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    tail: deque = deque(maxlen=TAIL_BYTES)
    out_tail: deque = deque(maxlen=TAIL_BYTES)
    proc = subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env)
    pumps = [
        threading.Thread(target=_pump, args=(proc.stdout, sys.stdout, out_tail), daemon=True),
        threading.Thread(target=_pump, args=(proc.stderr, sys.stderr, tail), daemon=True),
    ]
    for t in pumps:
        t.start()
    try:
        code = proc.wait()
    except BaseException:  # interrupted (SIGTERM of the pod, Ctrl-C): do not leave the stage running
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    finally:
        for t in pumps:
            t.join(timeout=10)
    if code != 0:
        if code < 0:
            try:
                how = f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
        else:
            how = f"failed with exit code {code}"
        last = bytes(tail).decode("utf-8", errors="replace").strip()
        raise RuntimeError(f"{what} {how}" + (f"; its last output:\n{last}" if last else " (see its output above)"))
    lines = [ln.strip() for ln in bytes(out_tail).decode("utf-8", errors="replace").splitlines() if ln.strip()]
    if lines:
        print(SUMMARY_PREFIX + lines[-1], flush=True)


def run_stage(
    stage: Sequence[str],
    params: Mapping[str, str] | None,
    args: Sequence[str] = (),
    overrides: Sequence[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    launcher: Sequence[str] | None = None,
) -> None:
    """Run ``pxpo <stage...>`` in a child process with the given params sections; raise on failure.

    ``params`` maps each section the stage reads to its ``section: value``
    YAML text (the component's ``params_<section>`` inputs); they are written
    as one params.yaml and passed with ``--sections``, so the stage can read
    nothing else. ``None``: a command without a config (``pxpo base build``).
    A non-zero exit (bad input, failed validation, a crash) raises
    RuntimeError, so KFP marks the task failed and nothing downstream runs.
    ``env`` adds environment variables for the child (e.g. ``KFP_RUN_ID``).
    """
    stage = list(stage)
    name = "pxpo " + " ".join(stage)
    if params is None:
        run_command(stage_command(stage, args, overrides=overrides or (), launcher=launcher), env=env, what=name)
        return
    expected = STAGE_SECTIONS.get(stage[0])
    if expected is not None and set(params) != set(expected):
        raise ValueError(f"{name} reads the params sections {sorted(expected)}, the component passed {sorted(params)}")
    with tempfile.TemporaryDirectory(prefix="pxpo-params-") as d:
        p = Path(d) / "params.yaml"
        p.write_text(params_text(params))
        cmd = stage_command(stage, args, params_file=str(p), sections=list(params), overrides=overrides or (), launcher=launcher)
        run_command(cmd, env=env, what=name)


def model_ref_args(model_dir: str) -> list[str]:
    """``model.path=...`` for a base-model artifact: the built model, or the reference it records."""
    ref = Path(model_dir) / "pxpo_model_ref.json"
    if ref.is_file():
        return [f"model.path={json.loads(ref.read_text())['path']}"]
    return [f"model.path={model_dir}"]


def write_model_ref(out_dir: str, ref: str) -> None:
    """Record a user model (hub id or mounted path) as the base-model artifact, without copying it."""
    os.makedirs(out_dir, exist_ok=True)
    Path(out_dir, "pxpo_model_ref.json").write_text(json.dumps({"path": ref}))


def log_json_metrics(metrics_artifact, json_path: str, keys: list[str] | None = None) -> None:
    """Copy numeric entries of a JSON file (or the last line of a JSONL file) into a KFP Metrics artifact.

    They are also written as JSON at the artifact's path: a Metrics output
    with no file there is a cache miss for ``kfp.local`` (it checks that every
    cached output exists), so the task would re-run on every local run.
    """
    text = Path(json_path).read_text().strip()
    data = json.loads(text.splitlines()[-1]) if json_path.endswith(".jsonl") else json.loads(text)
    logged = {}
    for k, v in data.items():
        if (keys is None or k in keys) and isinstance(v, (int, float)) and not isinstance(v, bool):
            metrics_artifact.log_metric(k, float(v))
            logged[k] = float(v)
    path = getattr(metrics_artifact, "path", None)
    if path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        Path(path).write_text(json.dumps(logged, indent=2) + "\n")
