"""First-epoch clip fractions against the clip range, per-element and mean ratio (issue 9 item 4).

    python bench/clipfrac.py --label tiny [--latent 64] [--threads 2] [--out bench/results/clipfrac.json] [k=v ...]

Runs ONE first epoch (sample -> label -> advantages -> train) through the
functions ``pxpo run`` uses, with params.yaml plus the overrides. Every loss
call of the training pass is recorded: the per-element log-ratios
logp - logp_old (B, C, h, w) and their per-sample means (B,). From them:

* rms of the element and of the mean log-ratios after each optimizer step, and
  rms_element / rms_mean against sqrt(d) (d = C*h*w): the scaling rule's premise;
* clipfrac_element(c) = fraction of element ratios outside 1 +- c and
  clipfrac_mean(c) = fraction of per-sample mean ratios outside 1 +- c, over
  the whole epoch (as the loop logs it), for a grid of c. Post hoc: the first
  micro-batch is on policy and so is the first update (nothing is clipped
  before it), so the log-ratios after one step do not depend on c; later
  steps depend on c a little, through which elements were clipped;
* the live diagnostics of the run (LossOutput: clipfrac, clipfrac_element,
  clipfrac_mean at the config's train.clip_range).

``--latent S`` runs the same model at an S x S latent (a copy of the model
directory whose UNet config says sample_size S, weights linked): the same
network and learning rate at another d. Appends one record under ``--label``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

ELEMENT_GRID = [1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 0.0128, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 3.2]
MEAN_GRID = [1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.0125, 0.03, 0.1, 0.2]


def resized_model(src: str, size: int, dest: Path) -> str:
    """A copy of pipeline dir ``src`` whose UNet samples ``size`` x ``size`` latents (files linked)."""
    src_p = Path(src).resolve()
    dest.mkdir(parents=True, exist_ok=True)
    for entry in src_p.iterdir():
        target = dest / entry.name
        if entry.name == "unet":
            target.mkdir(exist_ok=True)
            for f in entry.iterdir():
                t = target / f.name
                if f.name == "config.json":
                    cfg = json.loads(f.read_text())
                    cfg["sample_size"] = size
                    t.write_text(json.dumps(cfg, indent=2))
                elif not t.exists():
                    t.symlink_to(f)
        elif not target.exists():
            target.symlink_to(entry)
    return str(dest)


def frac_outside(diffs, clip: float) -> float:
    """Fraction of exp(diff) outside 1 +- clip over a list of tensors."""
    import torch

    n = sum(d.numel() for d in diffs)
    out = sum(int(((torch.exp(d.double().clamp(-20, 20)) - 1).abs() > clip).sum()) for d in diffs)
    return out / n


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--label", required=True)
    p.add_argument("--latent", type=int, default=None, help="run the model at this latent size")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="bench/results/clipfrac.json")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    import torch

    torch.set_num_threads(a.threads)
    import pxpo.training.loop as train_mod
    from pxpo.config import load_config
    from pxpo.labellers import make_reward
    from pxpo.prompts import PromptSource
    from pxpo.training.rollout import label_images, sample_seed, sample_trajectories
    from pxpo.core.advantages import PerPromptStatTracker
    from pxpo.core.losses import element_clip_range
    from pxpo.training.state import build_train_state

    params = "params.yaml" if Path("params.yaml").exists() else None
    overrides = list(a.overrides)
    cfg = load_config(params, overrides)
    if a.latent:
        path = resized_model(cfg.model.path, a.latent, Path(f"/tmp/pxpo_clipfrac_model_{a.latent}"))
        overrides.append(f"model.path={path}")
        cfg = load_config(params, overrides)
    t0 = time.perf_counter()
    pipe, state = build_train_state(cfg)
    rec = {"calls": [], "steps": 0, "live": [], "js": [], "j": None}
    step = state.optimizer.step

    def counted_step(*args, **kw):
        rec["steps"] += 1
        return step(*args, **kw)

    state.optimizer.step = counted_step

    policy = state.policy
    log_prob_fn = policy.log_prob

    def noting_step(denoiser, x_t, step_index, *args, **kw):  # the transitions of the next loss call
        rec["j"] = torch.as_tensor(step_index).long().expand(x_t.shape[0]).cpu()
        return log_prob_fn(denoiser, x_t, step_index, *args, **kw)

    policy.log_prob = noting_step

    def recording(fn):
        def wrapped(log_prob, old_log_prob, adv, **kw):
            out = fn(log_prob, old_log_prob, adv, **kw)
            diff = (log_prob.detach() - old_log_prob.detach()).float().cpu()
            rec["calls"].append((rec["steps"], diff))
            rec["js"].append(rec["j"])
            rec["live"].append({k: float(v) for k, v in out.diagnostics().items()})
            return out

        return wrapped

    import pxpo.training.step as step_mod

    for mod in (train_mod, step_mod):  # wherever the loop calls the losses from
        for name in ("pxpo_loss", "ddpo_loss"):
            if hasattr(mod, name):
                setattr(mod, name, recording(getattr(mod, name)))

    labeller = make_reward(cfg.reward)
    prompts_src = PromptSource.load(cfg.prompts.source)
    n = cfg.sample.batch_size * cfg.sample.num_batches
    prompts = prompts_src.draw(n, sample_seed(cfg.seed, 0, 0, 0))
    seeds = [sample_seed(cfg.seed, 0, 0, i) for i in range(n)]
    traj = sample_trajectories(pipe, cfg, prompts, seeds)
    t_sample = time.perf_counter() - t0
    maps, _ = label_images(labeller, traj.images, traj.prompts)
    latent_hw = tuple(traj.latents.shape[-2:])
    tracker = PerPromptStatTracker(cfg.train.buffer_size, cfg.train.min_count, cfg.train.baseline)
    adv = train_mod.compute_advantages(tracker, list(traj.prompts), maps, latent_hw, cfg.train.algorithm)
    t1 = time.perf_counter()
    logs = train_mod.train_on_trajectories(state, traj, adv, cfg, 0)
    t_train = time.perf_counter() - t1

    d = int(traj.latents[0, 0].numel())
    el = [x for _, x in rec["calls"]]
    means = [x.flatten(1).double().mean(1) for x in el]
    per_step = []
    for s in sorted({k for k, _ in rec["calls"]}):
        de = torch.cat([x.flatten() for k, x in rec["calls"] if k == s]).double()
        dm = torch.cat([x.flatten(1).double().mean(1) for k, x in rec["calls"] if k == s])
        rms_e, rms_m = float(de.square().mean().sqrt()), float(dm.square().mean().sqrt())
        per_step.append(
            {
                "optimizer_steps_before": s,
                "rms_log_ratio_element": rms_e,
                "rms_log_ratio_mean": rms_m,
                "quotient_over_sqrt_d": rms_e / rms_m / math.sqrt(d) if rms_m > 0 else None,
                "mean_log_ratio_mean": float(dm.mean()),
            }
        )
    # per transition j, after the first optimizer step (the first micro-batch is on policy)
    clip = cfg.train.clip_range
    after = [(x, j) for (k, x), j in zip(rec["calls"], rec["js"]) if k > 0]
    per_j = []
    if after:
        de = torch.cat([x.flatten(1) for x, _ in after]).double()
        js = torch.cat([j for _, j in after])
        for jj in sorted(set(js.tolist())):
            rows = de[js == jj]
            rms_e, m = float(rows.square().mean().sqrt()), rows.mean(1)
            rms_m = float(m.square().mean().sqrt())
            per_j.append(
                {
                    "j": jj,
                    "rms_log_ratio_element": rms_e,
                    "rms_log_ratio_mean": rms_m,
                    "quotient_over_sqrt_d": rms_e / rms_m / math.sqrt(d) if rms_m > 0 else None,
                    "clipfrac_element_rule": frac_outside([rows], element_clip_range(clip, d)),
                    "clipfrac_mean": frac_outside([m], clip),
                }
            )
    live = {k: sum(r[k] for r in rec["live"]) / len(rec["live"]) for k in rec["live"][0]}
    record = {
        "label": a.label,
        "overrides": overrides,
        "d": d,
        "latent": list(traj.latents.shape[2:]),
        "samples": n,
        "num_steps": cfg.sample.num_steps,
        "train_batch_size": cfg.train.batch_size,
        "optimizer_steps": rec["steps"],
        "algorithm": cfg.train.algorithm,
        "clip_range": clip,
        "clip_element_rule": element_clip_range(clip, d),
        "live_first_epoch": live,
        "train_logs": {k: v for k, v in logs.items() if isinstance(v, (int, float))},
        "per_step": per_step,
        "per_transition_after_first_step": per_j,
        "clipfrac_element_vs_clip": {str(c): frac_outside(el, c) for c in ELEMENT_GRID},
        "clipfrac_mean_vs_clip": {str(c): frac_outside(means, c) for c in MEAN_GRID},
        "rule_pairs": [
            {"clip_range": c, "clip_element": element_clip_range(c, d), "clipfrac_mean": frac_outside(means, c), "clipfrac_element": frac_outside(el, element_clip_range(c, d))}
            for c in MEAN_GRID
        ],
        "time_sample_s": t_sample,
        "time_train_s": t_train,
        "threads": a.threads,
    }
    out = Path(a.out)
    allr = json.loads(out.read_text()) if out.exists() else {}
    allr[a.label] = record
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(allr, indent=1))
    print(f"{a.label}: d={d} steps={rec['steps']} sample {t_sample:.1f}s train {t_train:.1f}s")
    print(f"  live: " + "  ".join(f"{k} {v:.4g}" for k, v in live.items()))
    for s in per_step:
        print(f"  after {s['optimizer_steps_before']} steps: rms el {s['rms_log_ratio_element']:.3e} mean {s['rms_log_ratio_mean']:.3e} quotient/sqrt(d) {s['quotient_over_sqrt_d'] or float('nan'):.3f}")
    for r in per_j:
        print(f"  j={r['j']:2d}: rms el {r['rms_log_ratio_element']:.3e} mean {r['rms_log_ratio_mean']:.3e} quotient/sqrt(d) {r['quotient_over_sqrt_d'] or float('nan'):.3f} clipfrac el(rule) {r['clipfrac_element_rule']:.3f} mean {r['clipfrac_mean']:.3f}")
    print("  clip_range -> clipfrac_mean | clip_range*sqrt(d) -> clipfrac_element")
    for r in record["rule_pairs"]:
        print(f"  {r['clip_range']:.0e} -> {r['clipfrac_mean']:.3f} | {r['clip_element']:.3g} -> {r['clipfrac_element']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
