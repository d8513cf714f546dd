"""End-to-end time of the pipeline on the embedded default, and the orchestration overhead.

    python bench/orchestration.py [--skip-kfp] [--skip-dvc]

Runs (1) `pxpo pipeline run --local` (kfp.local, every stage a subprocess) and
(2) `dvc repro` in a temporary git copy of the repository, both with the
built base models reused (models/base, models/lcm must exist: the DVC copy
records them with `dvc commit` instead of rebuilding). Every `pxpo` stage
writes its own wall time, and the time spent in Great Expectations and MLflow,
to $PXPO_TIMINGS_FILE. Stage compute = stage time - GE - MLflow; orchestration
overhead = end-to-end wall - stage compute (process start-up and imports,
KFP local and DVC bookkeeping, GE, MLflow). Writes bench/results/orchestration.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def split(timings_file: Path, wall: float, exclude=("stage:pipeline run",)) -> dict:
    recs = [json.loads(x) for x in timings_file.read_text().splitlines() if x]
    by_pid = defaultdict(list)
    for r in recs:
        by_pid[r["pid"]].append(r)
    stages = {}
    for pid, rs in by_pid.items():
        stage = [r for r in rs if r["what"].startswith("stage:") and r["what"] not in exclude]
        if not stage:
            continue
        name = stage[0]["what"][6:]
        ge = sum(r["seconds"] for r in rs if r["what"] == "ge")
        ml = sum(r["seconds"] for r in rs if r["what"] == "mlflow")
        total = stage[0]["seconds"]
        key = name
        i = 2
        while key in stages:
            key, i = f"{name} #{i}", i + 1
        stages[key] = {"stage_seconds": total, "ge_seconds": ge, "mlflow_seconds": ml, "compute_seconds": total - ge - ml}
    compute = sum(s["compute_seconds"] for s in stages.values())
    return {
        "wall_seconds": wall,
        "compute_seconds": compute,
        "overhead_seconds": wall - compute,
        "overhead_fraction": (wall - compute) / wall,
        "ge_seconds": sum(s["ge_seconds"] for s in stages.values()),
        "mlflow_seconds": sum(s["mlflow_seconds"] for s in stages.values()),
        "stages": stages,
    }


def run_kfp(tmp: Path) -> dict:
    tf = tmp / "kfp_timings.jsonl"
    env = {**os.environ, "PXPO_TIMINGS_FILE": str(tf)}
    env.pop("MLFLOW_TRACKING_URI", None)
    t0 = time.perf_counter()
    subprocess.run([str(BIN / "pxpo"), "pipeline", "run", "--local", "--params", "params.yaml", "--workdir", str(tmp / "kfp")],
                   cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    return split(tf, time.perf_counter() - t0)


def run_dvc(tmp: Path) -> dict:
    repo = tmp / "repo"
    repo.mkdir()
    for f in ("dvc.yaml", "params.yaml", ".gitignore"):
        shutil.copy(ROOT / f, repo / f)
    for d in ("data", "src"):
        shutil.copytree(ROOT / d, repo / d, ignore=shutil.ignore_patterns("prepared", "__pycache__", "*.egg-info"))
    for m in ("base", "lcm"):
        shutil.copytree(ROOT / "models" / m, repo / "models" / m)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@b",
           "GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@b"}
    env.pop("MLFLOW_TRACKING_URI", None)

    def sh(*cmd):
        subprocess.run(cmd, cwd=repo, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    sh("git", "init", "-q")
    sh(str(BIN / "dvc"), "init", "-q")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "bench")
    sh(str(BIN / "dvc"), "commit", "-f", "base", "lcm")  # the base models are built: record, don't rebuild
    tf = tmp / "dvc_timings.jsonl"
    env["PXPO_TIMINGS_FILE"] = str(tf)
    t0 = time.perf_counter()
    sh(str(BIN / "dvc"), "repro")
    return split(tf, time.perf_counter() - t0)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--skip-kfp", action="store_true")
    p.add_argument("--skip-dvc", action="store_true")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "orchestration.json"))
    a = p.parse_args(argv)
    for m in ("base", "lcm"):
        if not (ROOT / "models" / m / "model_index.json").is_file():
            sys.exit(f"models/{m} missing: run `pxpo base build` and `pxpo base distill-lcm` first")
    res = {"threads": os.environ.get("OMP_NUM_THREADS", "default"), "cpus": os.cpu_count(),
           # 1: Great Expectations imported in a worker process in parallel with the stage (the default); 0: in-process
           "ge_worker": os.environ.get("PXPO_GE_WORKER", "1")}
    with tempfile.TemporaryDirectory() as d:
        if not a.skip_kfp:
            res["kfp_local"] = run_kfp(Path(d))
        if not a.skip_dvc:
            res["dvc_repro"] = run_dvc(Path(d))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))
    for k in ("kfp_local", "dvc_repro"):
        if k in res:
            r = res[k]
            print(f"{k}: wall {r['wall_seconds']:.0f}s, stage compute {r['compute_seconds']:.0f}s, overhead {r['overhead_seconds']:.0f}s "
                  f"({100 * r['overhead_fraction']:.1f}%; GE {r['ge_seconds']:.0f}s, MLflow {r['mlflow_seconds']:.0f}s)")
            for s, v in r["stages"].items():
                print(f"    {s:14s} {v['stage_seconds']:6.1f}s (GE {v['ge_seconds']:.1f}s, MLflow {v['mlflow_seconds']:.1f}s)")


if __name__ == "__main__":
    sys.exit(main())
