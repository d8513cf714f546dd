"""A learned dense reward model in place of the true labeller: how much of PXPO's gain does it keep?

1. Sample ``--labelled`` images from the base model and label them with the true
   labeller (params.yaml's reward; the embedded default: brightness_target left_bright).
2. ``pxpo dense-reward train`` on them (a quarter held out): per-pixel correlation
   with the true maps on the held-out samples.
3. Two PXPO runs from the same base model, seeds and budget: one trained on the true
   maps, one on the dense model's maps (``reward.name: dense_model``).
4. Both final policies and the base model sample the same fresh seeds; the TRUE
   labeller scores all three. Gain = policy - base; the figure is
   ``gain(dense-model maps) / gain(true maps)``.

    python bench/dense_reward.py [--epochs 20] [--labelled 256] [--base models/base]

Writes bench/results/dense_reward.json. The base model is built first if missing
(``pxpo base build``, a few CPU minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _train(args):
    name, overrides, out = args
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    from pxpo.config import load_config
    from pxpo.stages.online import run_online
    from pxpo.tracking import JsonlTracker

    cfg = load_config(str(ROOT / "params.yaml"), [*overrides, f"output_dir={out}/{name}"])
    t0 = time.perf_counter()
    tracker = JsonlTracker(Path(cfg.output_dir))
    run_online(cfg, tracker, progress=False, resume=False)
    return name, tracker.history(), time.perf_counter() - t0


def _true_reward(cfg, policy, out: Path, epoch: int) -> float:
    from pxpo.core.rewards import make_labeller
    from pxpo.stages.sample import sample
    from pxpo.trajectories import load_trajectories

    sample(cfg, out, policy=policy, epoch=epoch)
    traj = load_trajectories(out)
    maps, _ = make_labeller(cfg.reward.name, **cfg.reward.kwargs)(traj.images, traj.prompts)
    return float(maps.mean())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--labelled", type=int, default=256, help="true-labelled samples the dense model is trained on")
    ap.add_argument("--steps", type=int, default=600, help="dense model training steps")
    ap.add_argument("--base", default=str(ROOT / "models" / "base"))
    ap.add_argument("--work", default=str(ROOT / "bench" / "results" / "runs" / "dense_reward"))
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    from pxpo.config import load_config
    from pxpo.dense_reward import train_dense_reward
    from pxpo.stages.base import build_base_model
    from pxpo.stages.label import label
    from pxpo.stages.sample import sample

    t0 = time.perf_counter()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    base = Path(a.base)
    if not (base / "model_index.json").is_file():
        print(f"building the base model at {base} ...", flush=True)
        build_base_model(base, progress=False)
    common = [f"model.path={base}", "seed=0", f"train.epochs={a.epochs}"]
    cfg = load_config(str(ROOT / "params.yaml"), common)
    true_reward = {"name": cfg.reward.name, "kwargs": cfg.reward.kwargs}

    # 1-2: labelled data and the dense model
    batches = max(1, a.labelled // cfg.sample.batch_size)
    data_cfg = load_config(str(ROOT / "params.yaml"), [*common, f"sample.num_batches={batches}"])
    sample(data_cfg, work / "labelled", epoch=1000)  # prompts / noise of a round the training runs never use
    label(data_cfg, work / "labelled")
    rm = train_dense_reward([work / "labelled"], work / "reward_model", steps=a.steps, heldout_fraction=0.25, seed=0)
    print(f"dense model: held-out per-pixel correlation {rm['heldout_pixel_corr']:.3f} ({rm['train_samples']} train / {rm['heldout_samples']} held out)", flush=True)

    # 3: PXPO on the true maps and on the model's maps
    runs = {
        "true_maps": common,
        "dense_model_maps": [*common, "reward.name=dense_model", f"reward.kwargs={{path: {work / 'reward_model'}}}"],
    }
    with ProcessPoolExecutor(2) as ex:
        results = list(ex.map(_train, [(k, v, str(work)) for k, v in runs.items()]))
    wall = {name: s for name, _, s in results}

    # 4: the true labeller scores base and both policies on the same fresh seeds
    eval_cfg = load_config(str(ROOT / "params.yaml"), [*common, "sample.num_batches=2"])
    scores = {"base": _true_reward(eval_cfg, None, work / "eval_base", 2000)}
    for name in runs:
        scores[name] = _true_reward(eval_cfg, work / name, work / f"eval_{name}", 2000)
    gain = {k: scores[k] - scores["base"] for k in runs}
    ratio = gain["dense_model_maps"] / gain["true_maps"] if gain["true_maps"] else float("nan")
    result = {
        "task": f"true reward {true_reward}", "epochs": a.epochs, "labelled_samples": rm["train_samples"] + rm["heldout_samples"],
        "dense_model": {k: rm[k] for k in ("train_samples", "heldout_samples", "heldout_pixel_corr", "heldout_mse", "seconds")},
        "true_reward_of_samples": scores, "gain": gain, "gain_ratio": ratio, "train_wall_s": wall,
        "histories": {name: h for name, h, _ in results}, "total_wall_s": time.perf_counter() - t0,
    }
    out = ROOT / "bench" / "results" / "dense_reward.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "histories"}, indent=2))
    print(f"PXPO on the dense model's maps reaches {100 * ratio:.0f}% of the gain of PXPO on the true maps -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
