"""Per-element and mean log-ratios after ONE LoRA step of the SD-1.5-shaped UNet, per DDIM transition (issue 9 item 4).

    python bench/clipfrac_sd.py [--model /tmp/pxpo/sd15] [--update-pairs 4] [--probe 0 10 25 40 45 47 48 49] \
        [--label sd15] [--out bench/results/clipfrac.json] [k=v ...]

A full SD-sized epoch (32 samples x 50 steps) takes hours on 2 CPU cores (a
guided UNet call at 512 px is 10 s, with backward 50 s), so this measures
what decides the clip fraction on the pairs that matter, with pxpo's own
pieces (build_train_state: LoRA r4, AdamW lr 3e-4; the DDIM policy at 50
steps; policy_loss: PXPO per element) on the real architecture:

1. x_t for a transition j: a random clean latent noised to timestep t_j
   (scheduler.add_noise); x_{t-1} sampled from the policy (its stored action)
   with its per-element log-prob. The random-weight UNet's own samples are no
   more realistic than this.
2. One optimizer step on ``--update-pairs`` such pairs (random j, random
   N(0, 1) advantage maps), as the first micro-batch of an epoch.
3. The ``--probe`` transitions (fresh pairs: their noise is independent of the
   update, as for every later micro-batch of an epoch) are re-scored under the
   new weights: per-element log-ratios, their per-pair mean, per j.

Adam's first step moves every trained parameter by about lr (m / sqrt(v) =
sign(g)), whatever the number of pairs behind g, so the size of the move and
of the log-ratios does not depend on --update-pairs (its direction does).
Later steps of an epoch are of the same size or smaller. Figures are in fp32
(no mixed precision on CPU); round-off under fp16 is tests/gpu's business.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

GRID = [1e-4, 3e-4, 1e-3, 2e-3, 5e-3, 0.0128, 0.02, 0.05, 0.1, 0.2]


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="/tmp/pxpo/sd15")
    p.add_argument("--update-pairs", type=int, default=4)
    p.add_argument("--probe", type=int, nargs="+", default=[0, 10, 25, 40, 45, 47, 48, 49])
    p.add_argument("--chunk", type=int, default=2, help="pairs per UNet call")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--label", default="sd15_one_step")
    p.add_argument("--out", default="bench/results/clipfrac.json")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    from pxpo.config import load_config
    from pxpo.core.losses import element_clip_range
    from pxpo.core.sampling import encode_cond
    from pxpo.training.step import policy_loss
    from pxpo.training.state import build_train_state

    base = [f"model.path={a.model}", "model.dtype=float32", "sample.num_steps=50", "sample.guidance_scale=5.0", "train.use_lora=true"]
    base += ["train.lora_rank=4", "train.lora_alpha=4.0", "train.learning_rate=3e-4", "train.clip_range=1e-4", "train.mixed_precision=auto"]
    cfg = load_config(None, [*base, "output_dir=/tmp/pxpo_clipfrac_sd", *a.overrides])
    t0 = time.perf_counter()
    pipe, state = build_train_state(cfg)
    policy, acc, unet = state.policy, state.accelerator, state.unet
    sched = policy.scheduler
    den = policy.denoiser(unet)
    latent = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    d = math.prod(latent)
    T = len(policy.timesteps)
    g = torch.Generator().manual_seed(0)
    upd_j = torch.randint(0, T, (a.update_pairs,), generator=g)
    probe_j = torch.tensor(a.probe)
    all_j = torch.cat([upd_j, probe_j])
    n = len(all_j)
    prompts = [f"a photo of a handwritten digit {i % 10}" for i in range(n)]
    with torch.no_grad():
        cond = encode_cond(pipe, prompts)
        uncond = encode_cond(pipe, [cfg.prompts.negative_prompt], negative=True)
    x0 = torch.randn(n, *latent, generator=g)
    eps = torch.randn(n, *latent, generator=g)
    t = policy.timesteps[all_j]
    x_t = sched.add_noise(x0, eps, t)
    gens = [torch.Generator().manual_seed(1000 + i) for i in range(n)]
    unet.eval()
    x_prev, lp_old = [], []
    with torch.no_grad():
        for c in range(0, n, a.chunk):
            sl = slice(c, min(n, c + a.chunk))
            idx = all_j[sl]
            out = policy.step(policy.predict(den, x_t[sl], idx, cond.index(sl), uncond), idx, x_t[sl], generator=gens[sl])
            x_prev.append(out.prev_sample.float())
            lp_old.append(out.log_prob.float())
    x_prev, lp_old = torch.cat(x_prev), torch.cat(lp_old)
    t_sample = time.perf_counter() - t0

    # one optimizer step: PXPO per element on the update pairs (their mean loss), random advantage maps
    t1 = time.perf_counter()
    unet.train()
    adv = torch.randn(a.update_pairs, *latent[1:], generator=g)
    k = a.update_pairs
    on_policy = []
    for c in range(0, k, a.chunk):
        sl = slice(c, min(k, c + a.chunk))
        out = policy.log_prob(den, x_t[sl], upd_j[sl], x_prev[sl], cond.index(sl), uncond)
        res = policy_loss(out.log_prob, lp_old[sl], adv[sl], cfg.train)
        on_policy.append(float((out.log_prob.detach() - lp_old[sl]).abs().max()))
        acc.backward(res.loss * (sl.stop - sl.start) / k)
    gn = float(acc.clip_grad_norm_(state.params, cfg.train.max_grad_norm))
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    t_update = time.perf_counter() - t1

    # re-score the fresh probe pairs under the new weights
    t2 = time.perf_counter()
    unet.eval()
    diffs = []
    with torch.no_grad():
        for c in range(k, n, a.chunk):
            sl = slice(c, min(n, c + a.chunk))
            out = policy.log_prob(den, x_t[sl], all_j[sl], x_prev[sl], cond.index(sl), uncond)
            diffs.append((out.log_prob.double() - lp_old[sl].double()))
    diff = torch.cat(diffs)
    t_probe = time.perf_counter() - t2

    clip = cfg.train.clip_range
    rule = element_clip_range(clip, d)
    std = [float(policy.step(torch.zeros(1, *latent), torch.tensor([j]), torch.zeros(1, *latent)).std.flatten()[0]) for j in a.probe]
    per_j = []
    for i, j in enumerate(a.probe):
        r = diff[i]
        m = float(r.mean())
        per_j.append(
            {
                "j": j,
                "timestep": int(policy.timesteps[j]),
                "sigma": std[i],
                "rms_log_ratio_element": float(r.square().mean().sqrt()),
                "mean_log_ratio": m,
                "noise_prediction_rms_over_sqrt_d": float(r.square().mean().sqrt()) / math.sqrt(d),
                "clipfrac_element": {str(c): float(((r.exp() - 1).abs() > c).double().mean()) for c in GRID},
                "mean_ratio_clipped_at_clip_range": abs(math.expm1(m)) > clip,
            }
        )
    allr = diff.flatten()
    record = {
        "label": a.label,
        "model": a.model,
        "d": d,
        "num_steps": T,
        "update_pairs_j": upd_j.tolist(),
        "grad_norm": gn,
        "on_policy_max_abs_log_ratio": max(on_policy),
        "clip_range": clip,
        "clip_element_rule": rule,
        "per_transition": per_j,
        "clipfrac_element_all_probes": {str(c): float(((allr.exp() - 1).abs() > c).double().mean()) for c in GRID},
        "time_s": {"sample": t_sample, "update": t_update, "probe": t_probe},
        "threads": a.threads,
    }
    out = Path(a.out)
    allrec = json.loads(out.read_text()) if out.exists() else {}
    allrec[a.label] = record
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(allrec, indent=1))
    print(f"{a.label}: d={d} T={T} grad_norm {gn:.3g} on-policy max|log ratio| {max(on_policy):.2e}; time {record['time_s']}")
    print(f"  rule clip {rule:.4g}; clipfrac_element over probes: " + ", ".join(f"{c:g}: {v:.3f}" for c, v in zip(GRID, record["clipfrac_element_all_probes"].values())))
    for r in per_j:
        ce = r["clipfrac_element"]
        print(
            f"  j={r['j']:2d} t={r['timestep']:3d} sigma {r['sigma']:.3g}: rms el {r['rms_log_ratio_element']:.3e} mean {r['mean_log_ratio']:+.3e} "
            f"(rms/sqrt(d) {r['noise_prediction_rms_over_sqrt_d']:.2e}) clipfrac el @1e-4 {ce['0.0001']:.3f} @rule {ce[str(0.0128)]:.3f}; "
            f"mean clipped @{clip:g}: {r['mean_ratio_clipped_at_clip_range']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
