"""Pixel-wise vs scalar Flow-GRPO and DiffusionNFT at equal sample counts (the embedded flow default).

The four variants start from the same base model (``pxpo base build --arch sd3`` ->
models/sd3) with the same seeds, hence the same prompts and first-epoch samples, and
the same budget (params.yaml's task: brightness_target, layout left_bright; 32
samples per epoch as 8 prompts x a group of 4; 10 flow steps, noise level 0.7, every
step an SDE step; group-relative advantages):

* ``pxpo``       pixel-wise Flow-GRPO: per-element log-probs x per-position group advantages
* ``ddpo``       scalar Flow-GRPO: the map's mean as the reward (Flow-GRPO as published)
* ``nft``        pixel-wise DiffusionNFT: per-element optimality weights
* ``nft_scalar`` scalar DiffusionNFT (as published)

All four sample with the same SDE policy, so the epochs differ only by the update.
Prints a table (final reward, gain, samples to a reward level, wall time, and the
pixel-wise / scalar gain ratio per seed) and writes JSON + a PNG plot.

    python bench/flow_benchmark.py [--epochs 20] [--seeds 0 1 2] [k=v overrides]

Each run uses one torch thread; two runs in parallel.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

FLOW = [
    "model.path=models/sd3",
    "sample.sampler=flow_sde",
    "sample.num_steps=10",
    "sample.noise_level=0.7",
    "sample.group_size=4",
    "train.advantage_mode=group",
    "train.probe_every=0",
]
PAIRS = {"pxpo": "ddpo", "nft": "nft_scalar"}  # pixel-wise -> its scalar version


def _one(args):
    algo, seed, epochs, overrides, out = args
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    from pxpo.config import load_config
    from pxpo.stages.online import run_online as run
    from pxpo.tracking import JsonlTracker

    params = "params.yaml" if Path("params.yaml").exists() else None
    cfg = load_config(
        params, [*FLOW, f"train.algorithm={algo}", f"seed={seed}", f"train.epochs={epochs}", f"output_dir={out}/{algo}_s{seed}", *overrides]
    )
    t0 = time.perf_counter()
    tracker = JsonlTracker(Path(cfg.output_dir))
    run(cfg, tracker, progress=False, resume=False)
    return algo, seed, tracker.history(), time.perf_counter() - t0


def _samples_to_reach(history, level):
    return next((h["samples_seen"] for h in history if h["reward_mean"] >= level), None)


def summarize(runs: dict, seeds, epochs, overrides) -> dict:
    base = sum(r["history"][0]["reward_mean"] for r in runs.values()) / len(runs)
    finals = {k: sum(h["reward_mean"] for h in r["history"][-3:]) / len(r["history"][-3:]) for k, r in runs.items()}
    firsts = {k: r["history"][0]["reward_mean"] for k, r in runs.items()}
    gains = {k: finals[k] - firsts[k] for k in runs}
    ratios = {
        f"{px}/{sc}_s{s}": (gains[f"{px}_s{s}"] / gains[f"{sc}_s{s}"] if gains[f"{sc}_s{s}"] > 0 else None)
        for px, sc in PAIRS.items() for s in seeds if f"{px}_s{s}" in runs and f"{sc}_s{s}" in runs
    }
    levels = [round(base + d, 3) for d in (0.05, 0.1, 0.15, 0.2, 0.25)]
    n_ep = min(len(r["history"]) for r in runs.values())
    budgets = sorted({max(3, round(n_ep * f)) for f in (0.25, 0.5, 0.75, 1.0)} & set(range(3, n_ep + 1)))

    def gain_at(k, e):  # mean reward of the 3 epochs ending at epoch e (1-based) minus the first epoch's
        h = runs[k]["history"]
        return sum(x["reward_mean"] for x in h[e - 3 : e]) / 3 - h[0]["reward_mean"]

    at_budget = {
        f"{px}/{sc}_s{s}": {
            str(runs[f"{px}_s{s}"]["history"][e - 1]["samples_seen"]): (gain_at(f"{px}_s{s}", e) / gain_at(f"{sc}_s{s}", e) if gain_at(f"{sc}_s{s}", e) > 0 else None)
            for e in budgets
        }
        for px, sc in PAIRS.items() for s in seeds if f"{px}_s{s}" in runs and f"{sc}_s{s}" in runs
    }
    return {
        "task": "flow default; " + " ".join(FLOW + list(overrides)),
        "epochs": epochs,
        "threads_per_process": 1,
        "initial_reward": base,
        "final_reward_last3": finals,
        "gain_last3_minus_first": gains,
        "gain_ratio_pixelwise_over_scalar": ratios,
        "gain_ratio_at_samples": at_budget,  # the same ratio after 25/50/75/100 % of the samples (3-epoch means)
        "samples_to_reach": {f"{lv:.3f}": {k: _samples_to_reach(r["history"], lv) for k, r in sorted(runs.items())} for lv in levels},
        "wall_s": {k: r["wall_s"] for k, r in runs.items()},
        "runs": runs,
    }


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--algos", nargs="+", default=["pxpo", "ddpo", "nft", "nft_scalar"])
    p.add_argument("--out", default="bench/results")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(algo, s, a.epochs, a.overrides, str(out / "runs" / "flow")) for s in a.seeds for algo in a.algos]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=a.workers) as ex:
        results = list(ex.map(_one, jobs))
    runs = {f"{algo}_s{seed}": {"algorithm": algo, "seed": seed, "history": h, "wall_s": w} for algo, seed, h, w in results}
    summary = summarize(runs, a.seeds, a.epochs, a.overrides)
    summary["total_wall_s"] = time.perf_counter() - t0
    from pxpo.plots import reward_curve

    reward_curve({k: r["history"] for k, r in runs.items()}, out / "flow_benchmark.png", title="pixel-wise vs scalar Flow-GRPO and NFT, equal samples")
    (out / "flow_benchmark.json").write_text(json.dumps(summary, indent=2))
    print(f"initial reward {summary['initial_reward']:.4f}; {summary['total_wall_s']:.0f}s in all")
    for k in runs:
        print(f"{k:16s} final(last 3) {summary['final_reward_last3'][k]:.4f}  gain {summary['gain_last3_minus_first'][k]:+.4f}  wall {runs[k]['wall_s']:.0f}s")
    print("gain ratio pixel-wise / scalar: " + "  ".join(f"{k}={'-' if v is None else f'{v:.2f}'}" for k, v in summary["gain_ratio_pixelwise_over_scalar"].items()))
    print("gain ratio pixel-wise / scalar at equal samples (3-epoch means): " + "  ".join(
        f"{k}: " + ", ".join(f"{n}={'-' if v is None else f'{v:.2f}'}" for n, v in row.items()) for k, row in summary["gain_ratio_at_samples"].items()))
    print("samples to first reach a reward level:")
    for lv, row in summary["samples_to_reach"].items():
        print(f"  {lv}: " + "  ".join(f"{k}={v}" for k, v in row.items()))


if __name__ == "__main__":
    sys.exit(main())
