"""KL to the reference against reward hacking: the gold reward with and without KL (the embedded default).

Trains the embedded default (models/base) on a hackable reward (default
``brightness_target`` with ``layout: all_bright``: painting the whole image
white satisfies it and destroys the digit) for ``--epochs`` epochs, once per
``train.kl_coef`` in ``--kl``, same seed. Every ``--every`` epochs (the
checkpoints) the policy samples a fixed held-out set (every digit prompt x
``--per-prompt`` samples, fixed seeds) that is scored by the trained reward
and by the gold reward ``digit_fidelity`` (P(prompted digit) under a digit
classifier training never sees; its accuracy too). Prints a table, writes
``bench/results/kl_gold.json``.

    python bench/kl_gold.py [--epochs 20] [--kl 0 0.1 1] [--every 5] [k=v overrides]

Runs go one after the other, each with ``--threads`` torch threads.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

HACKABLE = ["reward.name=brightness_target", "reward.kwargs={layout: all_bright}"]


def _score(cfg, pipe, unet_state, prompts, seeds):
    """(trained reward, gold digit_fidelity, gold accuracy) of the pipeline with ``unet_state`` (None: base)."""
    import numpy as np

    from pxpo.labellers import make_reward, make_gold
    from pxpo.training.rollout import label_images, sample_trajectories

    if unet_state is not None:
        pipe.unet.load_state_dict(unet_state)
    traj = sample_trajectories(pipe, cfg, prompts, seeds)
    maps, _ = label_images(make_reward(cfg.reward), traj.images, prompts)
    gold, info = label_images(make_gold(cfg.evaluate)["digit_fidelity"], traj.images, prompts)
    return float(maps.mean()), float(gold.mean()), float(np.mean(info["correct"])), traj.images


def one_run(kl: float, a, overrides) -> dict:
    from safetensors.torch import load_file

    from pxpo.config import load_config
    from pxpo.models import load_configured_pipeline
    from pxpo.prompts import digit_prompt
    from pxpo.stages.online import run_online

    out = Path(a.out) / f"kl{kl:g}"
    cfg = load_config("params.yaml" if Path("params.yaml").exists() else None, [
        *HACKABLE, f"train.epochs={a.epochs}", f"train.kl_coef={kl}", f"train.save_every={a.every}",
        f"train.keep_checkpoints={a.epochs // a.every + 1}", f"output_dir={out}", f"seed={a.seed}",
        "evaluate.gold=[{name: digit_fidelity}]", *overrides,
    ])
    t0 = time.perf_counter()
    run_online(cfg, progress=False, resume=False)
    seconds = time.perf_counter() - t0
    hist = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]

    prompts = [digit_prompt(d) for d in range(10) for _ in range(a.per_prompt)]
    seeds = list(range(50_000, 50_000 + len(prompts)))
    pipe = load_configured_pipeline(cfg)
    r, g, acc, base_images = _score(cfg, pipe, None, prompts, seeds)
    rows = [{"epoch": 0, "reward": r, "gold": g, "gold_accuracy": acc, "drift_pixel_l1": 0.0}]
    for ck in sorted((out / "checkpoints").glob("epoch_*")):
        epoch = int(ck.name.split("_")[1]) + 1
        state = load_file(str(ck / "model.safetensors"))
        r, g, acc, images = _score(cfg, pipe, state, prompts, seeds)
        rows.append({"epoch": epoch, "reward": r, "gold": g, "gold_accuracy": acc, "drift_pixel_l1": float((images - base_images).abs().mean())})
    return {"kl_coef": kl, "seconds": seconds, "checkpoints": rows,
            "train_kl_ref": [h.get("kl_ref") for h in hist], "train_reward": [h["reward_mean"] for h in hist]}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--every", type=int, default=5)
    p.add_argument("--kl", type=float, nargs="+", default=[0.0, 0.1, 1.0])
    p.add_argument("--per-prompt", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="bench/results/runs/kl_gold")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(a.threads)
    import torch

    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    runs = [one_run(kl, a, a.overrides) for kl in a.kl]
    result = {"reward": HACKABLE, "epochs": a.epochs, "seed": a.seed, "threads": a.threads, "overrides": a.overrides,
              "held_out_samples": 10 * a.per_prompt, "runs": runs, "wall_seconds": time.perf_counter() - t0}
    Path("bench/results").mkdir(parents=True, exist_ok=True)
    Path("bench/results/kl_gold.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'kl_coef':>8} {'epoch':>5} {'reward':>7} {'gold P':>7} {'gold acc':>8} {'drift':>6}")
    for r in runs:
        for c in r["checkpoints"]:
            print(f"{r['kl_coef']:>8g} {c['epoch']:>5d} {c['reward']:>7.4f} {c['gold']:>7.4f} {c['gold_accuracy']:>8.3f} {c.get('drift_pixel_l1', 0.0):>6.4f}")
        print(f"{'':>8} train {r['seconds']:.0f}s")
    print(f"wall {result['wall_seconds']:.0f}s; bench/results/kl_gold.json")


if __name__ == "__main__":
    main()
