"""RLCM (consistency policy, 4 steps) vs DDIM policy (20 steps): same pixel-wise task, same sample budget.

    python bench/rlcm_vs_ddim.py [--epochs 20] [--seeds 0] [--lcm-model models/lcm]

Both run PXPO with params.yaml's settings from their own base model (the DDIM
policy from models/base, the RLCM policy from its consistency distillation
models/lcm). Reports reward against samples and against wall-clock time
(sampling + labelling + training), and inference time per image after
training (one batch of 32, median of 3). One torch thread per run, the two
runs in parallel (the same conditions for both). Writes JSON + PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

# PPO clip 0.2 for the consistency policy: its last re-noising has a small fixed std
# (sqrt(1 - alphas_cumprod[0]) = 0.03), so per-element ratios move far more than
# DDIM's; 0.05 (the DDIM setting) clipped ~50% of elements and learned slowly.
# DDIM is run with both clip ranges so neither policy gets a setting the other lacks.
# The names give the PER-ELEMENT clip; train.clip_range is the mean-ratio epsilon and the per-element
# clip is clip_range * sqrt(C*h*w) = clip_range * 16 on the 4x8x8 default (pxpo.core.losses.element_clip_range).
VARIANTS = {
    "ddim20": ["sample.sampler=ddim", "sample.num_steps=20", "train.clip_range=0.003125"],
    "ddim20_clip0.2": ["sample.sampler=ddim", "sample.num_steps=20", "train.clip_range=0.0125"],
    "lcm4_clip0.2": ["sample.sampler=lcm", "sample.num_steps=4", "train.clip_range=0.0125"],
}


def _one(args):
    name, seed, epochs, model, overrides, out = args
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    from pxpo.config import load_config
    from pxpo.prompts import draw_prompts, load_prompts
    from pxpo.tracking import JsonlTracker
    from pxpo.training.rollout import sample_trajectories
    from pxpo.stages.online import run_online as run
    from pxpo.models import load_pipeline, load_policy_into

    params = "params.yaml" if Path("params.yaml").exists() else None
    cfg = load_config(params, [*VARIANTS[name], f"model.path={model}", f"seed={seed}", f"train.epochs={epochs}", f"output_dir={out}/{name}_s{seed}", *overrides])
    tracker = JsonlTracker(Path(cfg.output_dir))
    t0 = time.perf_counter()
    run(cfg, tracker, progress=False, resume=False)
    wall = time.perf_counter() - t0
    # inference after training: one batch, median of 3 (after a warm-up)
    pipe = load_pipeline(cfg.model.path, sampler=cfg.sample.sampler)
    load_policy_into(pipe, cfg.output_dir)
    prompts = draw_prompts(load_prompts(cfg.prompts.source), 32, 0)
    times = []
    for r in range(4):
        t1 = time.perf_counter()
        sample_trajectories(pipe, cfg, prompts, list(range(32)))
        if r:
            times.append(time.perf_counter() - t1)
    return name, seed, tracker.history(), wall, statistics.median(times) / 32


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--base-model", default="models/base")
    p.add_argument("--lcm-model", default="models/lcm")
    p.add_argument("--out", default="bench/results")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    models = {k: (a.lcm_model if k.startswith("lcm") else a.base_model) for k in VARIANTS}
    jobs = [(n, s, a.epochs, models[n], a.overrides, str(out / "runs")) for s in a.seeds for n in VARIANTS]
    with ProcessPoolExecutor(max_workers=2) as ex:
        results = list(ex.map(_one, jobs))
    runs = {}
    for name, seed, hist, wall, per_image in results:
        cum = 0.0
        for h in hist:
            cum += h["time_sample"] + h["time_label"] + h["time_train"]
            h["wall_clock"] = cum
        runs[f"{name}_s{seed}"] = {"variant": name, "seed": seed, "history": hist, "wall_s": wall, "inference_s_per_image": per_image}
    summary = {
        "threads_per_process": 1,
        "overrides": a.overrides,
        "final_reward_last3": {k: sum(h["reward_mean"] for h in r["history"][-3:]) / 3 for k, r in runs.items()},
        "initial_reward": {k: r["history"][0]["reward_mean"] for k, r in runs.items()},
        "train_wall_clock_s": {k: r["history"][-1]["wall_clock"] for k, r in runs.items()},
        "inference_s_per_image": {k: r["inference_s_per_image"] for k, r in runs.items()},
        "runs": runs,
    }
    from pxpo.plots import reward_curve

    reward_curve({k: r["history"] for k, r in runs.items()}, out / "rlcm_vs_ddim_samples.png", title="RLCM (4 steps) vs DDIM (20 steps): reward vs samples")
    # wall-clock curves: cumulative sample + label + train seconds
    reward_curve({k: r["history"] for k, r in runs.items()}, out / "rlcm_vs_ddim_time.png", x="wall_clock", title="reward vs training wall-clock (s, 1 thread)")
    (out / "rlcm_vs_ddim.json").write_text(json.dumps(summary, indent=2))
    for k in runs:
        print(
            f"{k:10s} reward {summary['initial_reward'][k]:.4f} -> {summary['final_reward_last3'][k]:.4f} (last 3)  "
            f"train wall {summary['train_wall_clock_s'][k]:.0f}s  inference {1000 * summary['inference_s_per_image'][k]:.1f} ms/image"
        )


if __name__ == "__main__":
    sys.exit(main())
