"""PXPO vs DDPO at equal sample counts on a pixel-wise target (the embedded default).

Both runs start from the same base model with the same seeds (hence the same
prompts and first-epoch samples) and the same budget; DDPO's scalar reward is
the mean of the same reward map. Prints a table and writes JSON + a PNG plot.

    python bench/pxpo_vs_ddpo.py [--epochs 20] [--seeds 0] [k=v overrides]

Each run uses one torch thread; runs of one seed go in parallel (2 processes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def _one(args):
    algo, seed, epochs, overrides, out = args
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    from pxpo.config import load_config
    from pxpo.tracking import JsonlTracker
    from pxpo.stages.online import run_online as run

    params = "params.yaml" if Path("params.yaml").exists() else None
    cfg = load_config(
        params,
        [f"train.algorithm={algo}", f"seed={seed}", f"train.epochs={epochs}", f"output_dir={out}/{algo}_s{seed}", *overrides],
    )
    t0 = time.perf_counter()
    tracker = JsonlTracker(Path(cfg.output_dir))
    run(cfg, tracker, progress=False, resume=False)
    return algo, seed, tracker.history(), time.perf_counter() - t0


def samples_to_reach(history, threshold):
    for h in history:
        if h["reward_mean"] >= threshold:
            return h["samples_seen"]
    return None


def threshold_table(runs: dict, thresholds=(0.6, 0.65, 0.7, 0.72, 0.74, 0.76, 0.78)) -> dict:
    """Samples each run needed to first reach each reward level (None: never in the budget)."""
    return {f"{t:.2f}": {k: samples_to_reach(r["history"], t) for k, r in sorted(runs.items())} for t in thresholds}


def summarize(runs: dict, overrides, epochs) -> dict:
    base = sum(r["history"][0]["reward_mean"] for r in runs.values()) / len(runs)
    finals = {k: sum(h["reward_mean"] for h in r["history"][-3:]) / 3 for k, r in runs.items()}
    threshold = base + 0.5 * (max(finals.values()) - base)
    by_algo = {}
    for k, r in runs.items():
        by_algo.setdefault(r["algorithm"], []).append(finals[k])
    return {
        "task": "overrides: " + " ".join(overrides),
        "epochs": epochs,
        "threads_per_process": 1,
        "initial_reward": base,
        "threshold": threshold,
        "final_reward_last3": finals,
        "final_reward_last3_mean_by_algorithm": {a: sum(v) / len(v) for a, v in by_algo.items()},
        "gain": {k: v - base for k, v in finals.items()},
        "samples_to_threshold": {k: samples_to_reach(r["history"], threshold) for k, r in runs.items()},
        "samples_to_reach": threshold_table(runs),
        "runs": runs,
    }


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--out", default="bench/results")
    p.add_argument("--algos", nargs="+", default=["pxpo", "ddpo"])
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(algo, s, a.epochs, a.overrides, str(out / "runs")) for s in a.seeds for algo in a.algos]
    with ProcessPoolExecutor(max_workers=2) as ex:
        results = list(ex.map(_one, jobs))
    runs = {f"{algo}_s{seed}": {"algorithm": algo, "seed": seed, "history": h, "wall_s": w} for algo, seed, h, w in results}
    summary = summarize(runs, a.overrides, a.epochs)
    base, threshold, finals = summary["initial_reward"], summary["threshold"], summary["final_reward_last3"]
    from pxpo.plots import reward_curve

    reward_curve({k: r["history"] for k, r in runs.items()}, out / "pxpo_vs_ddpo.png", title="PXPO vs DDPO, equal samples")
    (out / "pxpo_vs_ddpo.json").write_text(json.dumps(summary, indent=2))
    print(f"initial reward {base:.4f}; threshold {threshold:.4f}")
    for k in runs:
        print(f"{k:12s} final(last 3) {finals[k]:.4f}  gain {finals[k] - base:+.4f}  samples to threshold {summary['samples_to_threshold'][k]}  wall {runs[k]['wall_s']:.0f}s")
    print("samples to first reach each reward level:")
    for t, row in summary["samples_to_reach"].items():
        print(f"  {t}: " + "  ".join(f"{k}={v}" for k, v in row.items()))


if __name__ == "__main__":
    sys.exit(main())
