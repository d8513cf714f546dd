"""Region-level vs whole-image preferences at equal labelled pairs: online D3PO on the embedded default (issue 24 item 5).

A synthetic annotator compares the two images of each aligned pair (``sample.pairs``:
one prompt, the same initial noise, ``--shared-steps`` shared denoising steps) against a
hidden per-pixel reward r, the task's own labeller (params.yaml: ``ink_colour`` red,
each pixel's ink in red):

* ``region``: a preference map m = clip(scale (r_A - r_B), -1, 1) (``train.preference_map:
  region``, ``reward.preference_scale: --scale``): "A is better here", where the images differ;
* ``whole``: one preference per pair, sign(mean r_A - mean r_B), constant over the image
  (``train.preference_map: whole`` with ``reward.preference_scale: 1``: r is in [0, 1], so
  clip((r_A - r_B) x 1) never clips and sign(mean m) is exactly that sign): D3PO as published.

Both train ``train.algorithm: d3po`` online from the same base model with the same seeds (the
same prompts, noise and first labelled pairs), the same number of labelled pairs per epoch,
and the same budget. Every ``--probe-every`` epochs the policy samples a fixed held-out batch
(the drift probe's prompts and seeds, which training never draws; ``--probe-samples``) and the
hidden reward is scored on it (``heldout_reward``; the base model's on the same batch is the
start, at 0 pairs). Figures: the held-out reward against labelled pairs; the labelled pairs each
method needs to first reach levels (the base's held-out reward + f x the gap the better method
closes, f = 0.25, 0.5, ...; the mean of 2 consecutive probes, so one probe does not count alone);
per seed whole's pairs / region's pairs (the label efficiency of region-level preferences: the
issue's target is >= 2 on every seed; a method that never reaches a level gives a lower bound).

    python bench/preference_benchmark.py [--epochs 16] [--seeds 0 1 2] [--workers 2] [--refresh] [-- k=v overrides]

One torch thread per run, ``--workers`` runs at a time (a seed's two runs together).
Writes ``bench/results/preference_benchmark/preference_benchmark.json`` and ``heldout.png``;
the runs' directories under ``bench/results/preference_benchmark/runs/`` (not versioned).
``--refresh``: no training, the figures again from the JSON's runs.
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
OUT = ROOT / "bench" / "results" / "preference_benchmark"
FRACTIONS = (0.25, 0.5, 0.75, 1.0)  # levels: base + f x the better method's mean held-out gain
SMOOTH = 2  # consecutive probes averaged for the level crossings and the final figure
VARIANTS = ("region", "whole")


def common(a) -> list[str]:
    """Overrides both variants share (over params.yaml)."""
    return [
        f"model.path={a.base}", "train.algorithm=d3po", "sample.pairs=true", f"sample.pair_shared_steps={a.shared_steps}",
        f"sample.batch_size={2 * a.pairs}", "sample.num_batches=1", f"train.batch_size={a.train_batch}",
        f"train.timestep_fraction={a.timestep_fraction}", f"train.learning_rate={a.lr}", f"train.kl_coef={a.kl}", f"train.probe_every={a.probe_every}",
        f"train.probe_samples={a.probe_samples}", "train.save_every=1000", *a.overrides,
    ]


def variant(name: str, scale: float) -> list[str]:
    return {"region": ["train.preference_map=region", f"reward.preference_scale={scale}"],
            "whole": ["train.preference_map=whole", "reward.preference_scale=1"]}[name]


def _one(job):
    """One run in a worker process (one torch thread): the loop with the drift probe also scoring the hidden reward."""
    name, seed, epochs, overrides, out = job
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    from pxpo.config import load_config
    from pxpo.core.rewards import make_labeller
    from pxpo.stages.online import run_online
    from pxpo.tracking import JsonlTracker
    from pxpo.training import guardrails

    from pxpo.errors import PxpoInputError

    try:
        cfg = load_config(str(ROOT / "params.yaml"), [*overrides, f"seed={seed}", f"train.epochs={epochs}", f"output_dir={out}/{name}_s{seed}"])
    except PxpoInputError as e:  # (its pickling needs all three fields: the pool would only say 'broken')
        raise RuntimeError(str(e)) from None
    import pxpo.labellers  # noqa: F401  (registers digit_fidelity)

    hidden = make_labeller(cfg.reward.name, **cfg.reward.kwargs)
    gold = make_labeller("digit_fidelity", score="correct")  # is the prompted digit still there (not a reward hack)?
    drift = guardrails.DriftProbe.__dict__.get("_unscored", guardrails.DriftProbe.drift)  # a worker runs several jobs: wrap once
    guardrails.DriftProbe._unscored = drift

    def scored(self, images, latents):  # the probe's held-out batch: also the hidden reward, of the policy and of the base
        d = drift(self, images, latents)
        with torch.no_grad():
            d["heldout_reward"] = float(hidden(images.float(), self.prompts)[0].mean())
            d["heldout_reward_base"] = float(hidden(self.base[0].float(), self.prompts)[0].mean())
            d["heldout_digit_fidelity"] = float(gold(images.float(), self.prompts)[0].mean())
            d["heldout_digit_fidelity_base"] = float(gold(self.base[0].float(), self.prompts)[0].mean())
            d["heldout_ink"] = float(images.float().amax(1).mean())  # mean ink strength (max channel): erased digits -> 0
            d["heldout_ink_base"] = float(self.base[0].float().amax(1).mean())
        return d

    guardrails.DriftProbe.drift = scored
    t0 = time.perf_counter()
    tracker = JsonlTracker(Path(cfg.output_dir))
    run_online(cfg, tracker, progress=False, resume=False)
    return name, seed, tracker.history(), time.perf_counter() - t0


def curve(history: list[dict]) -> list[tuple[int, float]]:
    """(labelled pairs seen, held-out reward) at 0 pairs (the base) and at every probe."""
    probes = [h for h in history if "heldout_reward" in h]
    if not probes:
        return []
    return [(0, probes[0]["heldout_reward_base"])] + [(h["samples_seen"] // 2, h["heldout_reward"]) for h in probes]


def smoothed(points: list[tuple[int, float]], k: int = SMOOTH) -> list[tuple[int, float]]:
    k = min(k, len(points))
    return [(points[i][0], sum(v for _, v in points[i - k + 1 : i + 1]) / k) for i in range(k - 1, len(points))]


def pairs_to_reach(points, level: float) -> int | None:
    """Labelled pairs when the 2-probe mean first reaches ``level`` (None: not within the budget)."""
    return next((n for n, v in smoothed(points) if v >= level), None)


def summarize(runs: dict, seeds: list[int]) -> dict:
    curves = {k: curve(r["history"]) for k, r in runs.items()}
    base = {k: c[0][1] for k, c in curves.items()}
    final = {k: smoothed(c)[-1][1] for k, c in curves.items()}
    gain = {k: final[k] - base[k] for k in runs}
    mean_gain = {v: sum(gain[f"{v}_s{s}"] for s in seeds if f"{v}_s{s}" in gain) / max(1, sum(f"{v}_s{s}" in gain for s in seeds)) for v in VARIANTS}
    better = max(mean_gain, key=mean_gain.get)
    unit = mean_gain[better]
    budget = max(c[-1][0] for c in curves.values())
    reach, efficiency, gain_ratio = {}, {}, {}
    for s in seeds:
        rk, wk = f"region_s{s}", f"whole_s{s}"
        if rk not in runs or wk not in runs:
            continue
        b = base[rk]  # the same base model and probe batch: the same start for both
        levels = {f"{f:g}": b + f * unit for f in FRACTIONS}
        reach[f"s{s}"] = {lv: {"region": pairs_to_reach(curves[rk], x), "whole": pairs_to_reach(curves[wk], x), "level": x} for lv, x in levels.items()}
        # whole's pairs / region's; whole never there: >= budget / region's ("lower_bound"); region never there: None
        efficiency[f"s{s}"] = {lv: None if r["region"] is None else {"ratio": (r["whole"] or budget) / r["region"], "lower_bound": r["whole"] is None}
                               for lv, r in reach[f"s{s}"].items()}
        gain_ratio[f"s{s}"] = gain[rk] / gain[wk] if gain[wk] > 0 else None
    return {
        "heldout_base": base, "heldout_final_last2": final, "heldout_gain": gain, "mean_gain": mean_gain,
        "better_method": better, "level_unit": unit, "budget_pairs": budget, "pairs_to_reach": reach,
        "label_efficiency_region_over_whole": efficiency, "gain_ratio_region_over_whole": gain_ratio,
        "heldout_peak": {k: max(smoothed(c), key=lambda x: x[1])[1] for k, c in curves.items()},  # the best 2-probe mean
        "heldout_peak_pairs": {k: max(smoothed(c), key=lambda x: x[1])[0] for k, c in curves.items()},
        "heldout_digit_fidelity_curve": {k: [(h["samples_seen"] // 2, h["heldout_digit_fidelity"]) for h in r["history"] if "heldout_digit_fidelity" in h]
                                         for k, r in runs.items()},
        "train_reward_last3": {k: sum(h["reward_mean"] for h in r["history"][-3:]) / len(r["history"][-3:]) for k, r in runs.items()},
        "pref_accuracy_last3": {k: sum(h.get("pref_accuracy", float("nan")) for h in r["history"][-3:]) / len(r["history"][-3:]) for k, r in runs.items()},
        "probe_drift_pixel_l1_last": {k: next((h["probe_drift_pixel_l1"] for h in reversed(r["history"]) if "probe_drift_pixel_l1" in h), None)
                                      for k, r in runs.items()},
        "heldout_digit_fidelity_base_last": {k: _last(r["history"], "heldout_digit_fidelity_base") for k, r in runs.items()},
        "heldout_digit_fidelity_last": {k: _last(r["history"], "heldout_digit_fidelity") for k, r in runs.items()},
        "heldout_ink_base_last": {k: _last(r["history"], "heldout_ink_base") for k, r in runs.items()},
        "heldout_ink_last": {k: _last(r["history"], "heldout_ink") for k, r in runs.items()},
        "wall_s": {k: r["wall_s"] for k, r in runs.items()},
    }


def _last(history: list[dict], key: str):
    return next((h[key] for h in reversed(history) if key in h), None)


def plot(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for k, r in sorted(runs.items()):
        pts = curve(r["history"])
        ax.plot([p for p, _ in pts], [v for _, v in pts], color="C0" if r["variant"] == "region" else "C1",
                marker="o", ms=3, alpha=0.5 + 0.5 * (r["seed"] == 0), label=k)
    ax.set_xlabel("labelled pairs")
    ax.set_ylabel("held-out hidden reward (probe batch)")
    ax.set_title("region-level vs whole-image preferences (D3PO, equal pairs)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _f(x) -> float:
    return float("nan") if x is None else x


def report(s: dict) -> None:
    print(f"held-out hidden reward (probe batch of {s['probe_samples']}); levels: base + f x {s['better_method']}'s mean gain "
          f"({s['level_unit']:+.4f}); budget {s['budget_pairs']} pairs per run; {s.get('total_wall_s', 0):.0f}s in all")
    for k in sorted(s["heldout_final_last2"]):
        print(f"{k:10s} base {s['heldout_base'][k]:.4f} -> final(last 2 probes) {s['heldout_final_last2'][k]:.4f}  gain {s['heldout_gain'][k]:+.4f}  "
              f"train reward(last 3) {s['train_reward_last3'][k]:.4f}  pref acc {s['pref_accuracy_last3'][k]:.2f}  "
              f"drift {_f(s['probe_drift_pixel_l1_last'][k]):.3f}  digit fidelity {_f(s['heldout_digit_fidelity_base_last'][k]):.2f} -> "
              f"{_f(s['heldout_digit_fidelity_last'][k]):.2f}  ink {_f(s['heldout_ink_base_last'][k]):.3f} -> "
              f"{_f(s['heldout_ink_last'][k]):.3f}  peak {s['heldout_peak'][k]:.4f} at {s['heldout_peak_pairs'][k]} pairs  wall {s['wall_s'][k]:.0f}s")
    print("labelled pairs to first reach a level (2-probe mean), whole's / region's:")
    for seed, row in s["pairs_to_reach"].items():
        eff = s["label_efficiency_region_over_whole"][seed]
        print(f"  {seed}: " + "  ".join(
            f"f={lv} ({r['level']:.4f}): region {r['region']} whole {r['whole']} -> "
            + ("-" if eff[lv] is None else f"{'>=' if eff[lv]['lower_bound'] else ''}{eff[lv]['ratio']:.2f}x") for lv, r in row.items())
            + f";  gain ratio {_f(s['gain_ratio_region_over_whole'][seed]):.2f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--pairs", type=int, default=16, help="labelled pairs per epoch (sample.batch_size = 2 x this)")
    p.add_argument("--train-batch", type=int, default=8, help="train.batch_size (samples: half as many pairs)")
    p.add_argument("--shared-steps", type=int, default=4, help="sample.pair_shared_steps")
    p.add_argument("--scale", type=float, default=4.0, help="region: reward.preference_scale")
    p.add_argument("--timestep-fraction", type=float, default=0.5)
    p.add_argument("--lr", type=float, default=1e-4, help="train.learning_rate (params.yaml's 1e-3 is PXPO's with PPO clipping; "
                   "D3PO has no clip and wrecked the model within 4 epochs at 1e-3)")
    p.add_argument("--kl", type=float, default=0.0, help="train.kl_coef (D3PO's own reference term stays)")
    p.add_argument("--probe-every", type=int, default=1)
    p.add_argument("--probe-samples", type=int, default=32)
    p.add_argument("--base", default=str(ROOT / "models" / "base"))
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--refresh", action="store_true", help="no training: the figures again from the runs in the JSON")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    out = Path(a.out)
    js = out / "preference_benchmark.json"
    if a.refresh:
        s = json.loads(js.read_text())
        runs = s.pop("runs")
        s.update(summarize(runs, s["seeds"]))
        s["runs"] = runs
        js.write_text(json.dumps(s, indent=2) + "\n")
        plot(runs, out / "heldout.png")
        report(s)
        return 0
    if not (Path(a.base) / "model_index.json").is_file():
        print(f"no base model at {a.base}: run `pxpo base build` first", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    shared = common(a)
    jobs = [(v, s, a.epochs, [*shared, *variant(v, a.scale)], str(out / "runs")) for s in a.seeds for v in VARIANTS]
    with ProcessPoolExecutor(max_workers=a.workers) as ex:
        results = list(ex.map(_one, jobs))
    runs = {f"{v}_s{s}": {"variant": v, "seed": s, "history": h, "wall_s": w} for v, s, h, w in results}
    s = {
        "task": "hidden per-pixel reward = params.yaml's labeller (ink_colour red); region: m = clip(scale (r_A - r_B)); "
                "whole: sign(mean r_A - mean r_B) everywhere; train.algorithm d3po online",
        "model": a.base, "config": shared, "variants": {v: variant(v, a.scale) for v in VARIANTS},
        "epochs": a.epochs, "seeds": a.seeds, "pairs_per_epoch": a.pairs, "probe_samples": a.probe_samples,
        "threads_per_run": 1, "workers": a.workers, **summarize(runs, a.seeds), "total_wall_s": time.perf_counter() - t0, "runs": runs,
    }
    out.mkdir(parents=True, exist_ok=True)
    js.write_text(json.dumps(s, indent=2) + "\n")
    plot(runs, out / "heldout.png")
    report(s)
    print(f"-> {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
