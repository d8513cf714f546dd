"""Pixel credit from a learned scalar reward: PXPO on its gradient-attribution maps vs DDPO on the scalar (issue 22 item 5).

The reward is a small CNN, one scalar per image, trained here (seconds on
one thread) to score a local property of the tiny default's digits: the ink
of the left half, ``t(x)`` = the mean luminance of the 8 left columns of the
16 x 16 image (white ink on black). Being learned, only its gradient, not a
formula, says which pixels matter.

1. The base model samples ``--labelled`` images (epoch 1000's prompts and
   noise, which no training run draws). ``t`` labels them and augmented
   copies (shifted, overlaid, brightened or dimmed in a random box: images a
   policy may drift to); the CNN fits ``t``. A quarter of the base samples is
   held out: correlation and RMSE of the CNN with ``t``.
2. Per seed, from the same base model with the same prompts, noise and budget
   (params.yaml's training settings unless overridden):

   * ``pxpo``: ``reward.name: attribution`` over the CNN (``base:
     attribution_benchmark:cnn_reward``, gradient x input, ``--patch``, fill
     0.5): maps whose pixel mean is the CNN's scalar;
   * ``ddpo``: ``train.algorithm: ddpo`` on the CNN's scalar;
   * ``pxpo_density`` (optional): PXPO on the same attribution with its
     deviations as reward per unit area (:func:`density_attribution`, x
     ``H W / patch^2``), to show what the adapter's scale costs.

   All log the CNN's scalar as ``reward_mean`` (the levels below are on it)
   and ``t`` itself as ``reward_left_ink`` (a component of weight 0: it
   changes no map), to tell a real gain from the CNN's errors.
3. Samples to first reach reward levels (the mean of 3 consecutive epochs, so
   one lucky batch does not count), the gain of the last 3 epochs over the
   first, wall time; per seed, DDPO's samples / PXPO's samples to each level.

    python bench/attribution_benchmark.py [--flow] [--epochs 20] [--seeds 0 1 2] [--workers 2]
        [--variants pxpo pxpo_density ddpo] [--patch 4] [-- k=v overrides]

``--flow``: the tiny SD3 default (``models/sd3``) with bench/flow_benchmark.py's
sampler and group advantages (Flow-GRPO: ``pxpo`` pixel-wise, ``ddpo``
scalar); without it the DDIM default (``models/base``). The measured run
(docs/benchmarks.md): ``--flow --epochs 15 --variants pxpo pxpo_density ddpo
-- train.kl_coef=0``. Each run uses one torch thread, ``--workers`` runs at a
time. Writes ``bench/results/attribution_benchmark.json`` and ``.png``. The
CNN is a labeller by ``module:function`` (``attribution_benchmark:cnn_reward``,
kwargs ``path``; ``attribution_benchmark:left_ink`` is ``t``): this file's
folder goes on ``sys.path`` of every run, as ``PYTHONPATH=bench`` would.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
MODULE = "attribution_benchmark"  # the module name pxpo imports this file by (BENCH on sys.path)
LEVEL_FRACTIONS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5)  # reward levels: first epoch + f x DDPO's mean final gain
SMOOTH = 3  # epochs averaged for the level crossings and the final reward
FLOW = [  # --flow: the tiny SD3 default with bench/flow_benchmark.py's settings (Flow-GRPO: pxpo pixel-wise, ddpo scalar)
    "model.path=models/sd3",
    "sample.sampler=flow_sde",
    "sample.num_steps=10",
    "sample.noise_level=0.7",
    "sample.group_size=4",
    "train.advantage_mode=group",
]


# --------------------------------------------------------------------------
# the property and the CNN that learns it


def left_ink_of(images: torch.Tensor) -> torch.Tensor:
    """``t(x)``: mean BT.601 luminance of the left half, ``(B, 3, H, W)`` in [0, 1] -> ``(B,)``."""
    lum = 0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]
    return lum[..., : images.shape[-1] // 2].mean(dim=(1, 2))


class InkCNN(nn.Module):
    """``(B, 3, S, S)`` in [0, 1] -> ``(B,)``: two 3 x 3 convolutions (the second with stride 2) and a linear head.

    The head sees every position, so the CNN can score where the ink is. No
    batch statistics: each image's score depends on that image only, as the
    attribution adapter requires. ``mean`` / ``std`` undo the label scaling.
    """

    def __init__(self, size: int = 16, channels: int = 16, mean: float = 0.0, std: float = 1.0):
        super().__init__()
        self.config = {"size": size, "channels": channels, "mean": float(mean), "std": float(std)}
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, stride=2)
        self.head = nn.Linear(channels * (size // 2) ** 2, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv1(images * 2 - 1))
        x = F.gelu(self.conv2(x))
        return self.head(x.flatten(1))[:, 0] * self.config["std"] + self.config["mean"]


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random copies of images ``(B, 3, H, W)``: a horizontal shift of up to 3 pixels, another image's ink
    overlaid (half of them), a random box brightened or dimmed (half), 8-bit rounding."""
    b, _, h, w = x.shape
    out = torch.empty_like(x)
    shifts = torch.randint(-3, 4, (b,), generator=g)
    for i in range(b):
        s = int(shifts[i])
        out[i] = 0
        if s >= 0:
            out[i, :, :, s:] = x[i, :, :, : w - s]
        else:
            out[i, :, :, :s] = x[i, :, :, -s:]
    overlay = torch.rand(b, generator=g) < 0.5
    other = x[torch.randperm(b, generator=g)]
    out = torch.where(overlay[:, None, None, None], torch.maximum(out, other), out)
    for i in torch.nonzero(torch.rand(b, generator=g) < 0.5)[:, 0].tolist():
        y0, x0 = (int(v) for v in torch.randint(0, h - 3, (2,), generator=g))
        y1 = y0 + int(torch.randint(3, h - y0 + 1, (1,), generator=g))
        x1 = x0 + int(torch.randint(3, w - x0 + 1, (1,), generator=g))
        gain, bias = float(torch.rand(1, generator=g)) + 0.5, float(torch.rand(1, generator=g)) * 0.8 - 0.3
        out[i, :, y0:y1, x0:x1] = out[i, :, y0:y1, x0:x1] * gain + bias
    return (out.clamp(0, 1) * 255).round() / 255


def fit_cnn(images: torch.Tensor, *, steps: int = 600, batch: int = 64, lr: float = 3e-3, seed: int = 0,
            heldout_fraction: float = 0.25) -> tuple[InkCNN, dict]:
    """Fit :class:`InkCNN` to ``t`` on ``images`` ``(N, 3, S, S)`` and augmented copies (mean squared error).

    Returns the model (eval mode, parameters frozen) and its figures: correlation
    and RMSE with ``t`` on the held-out base images and on augmented copies of them.
    """
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    perm = torch.randperm(len(images), generator=g)
    n_held = max(1, int(len(images) * heldout_fraction))
    held, train = images[perm[:n_held]], images[perm[n_held:]]
    t_train = left_ink_of(augment(train, g))
    model = InkCNN(images.shape[-1], mean=float(t_train.mean()), std=float(t_train.std()))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    t0 = time.perf_counter()
    for _ in range(steps):
        x = augment(train[torch.randint(0, len(train), (batch,), generator=g)], g)
        loss = F.mse_loss((model(x) - model.config["mean"]) / model.config["std"], (left_ink_of(x) - model.config["mean"]) / model.config["std"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval().requires_grad_(False)
    held_aug = augment(held, torch.Generator().manual_seed(seed + 1))
    figures = {"train_images": len(train), "heldout_images": n_held, "steps": steps, "seconds": time.perf_counter() - t0}
    for name, x in (("heldout", held), ("heldout_augmented", held_aug)):
        with torch.no_grad():
            p, t = model(x).double(), left_ink_of(x).double()
        figures[f"{name}_corr"] = float(torch.corrcoef(torch.stack([p, t]))[0, 1])
        figures[f"{name}_rmse"] = float((p - t).pow(2).mean().sqrt())
        figures[f"{name}_t_std"] = float(t.std())
    return model, figures


def save_cnn(model: InkCNN, path: Path) -> None:
    torch.save({"config": model.config, "state_dict": model.state_dict()}, path)


def load_cnn(path: str | Path) -> InkCNN:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    model = InkCNN(**blob["config"])
    model.load_state_dict(blob["state_dict"])
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------
# labellers (pxpo factories: factory(**kwargs) -> fn(images, prompts))


def cnn_reward(path: str):
    """The learned scalar: ``fn(images (B, 3, H, W) in [0, 1], prompts) -> (B,)``, differentiable in the images."""
    model = load_cnn(path)

    def fn(images: torch.Tensor, prompts) -> torch.Tensor:
        return model(images.float())

    return fn


def left_ink():
    """``t`` itself (what the CNN was trained to score): ``(B, 3, H, W) -> (B,)``."""

    def fn(images: torch.Tensor, prompts) -> torch.Tensor:
        return left_ink_of(images.float())

    return fn


def density_attribution(base: str, base_kwargs: dict | None = None, patch: int = 4, fill: float = 0.5):
    """The ``attribution`` adapter's map with its deviations as reward per unit area (this benchmark's third variant).

    The adapter's map is ``m = r + S - mean(S)``, ``S`` the attribution summed
    over a ``patch x patch`` window: the reward a window holds, so for a
    reward spread over the image the deviations are about ``patch^2 / (H W)``
    of the reward's own spread (1/16 here at patch 4), and PXPO's advantages
    are mostly DDPO's scalar one. This map divides the window sum by its area
    and multiplies by the image's: ``m = r + (H W / patch^2) (S - mean(S))``
    (each map's mean is still ``r``; for a reward ``r = mean_p f(x_p)`` and
    ``patch=1`` it is ``f``'s own map to first order, ``fill`` as the zero).
    """
    from pxpo.core.rewards.adapters import base_scalar_fn
    from pxpo.core.rewards.attribution import attribution_map

    scalar_fn = base_scalar_fn(base, base_kwargs)

    def fn(images: torch.Tensor, prompts):
        maps, r = attribution_map(scalar_fn, images, prompts, "gradient", 1, patch, fill)
        r = r.to(maps.device, maps.dtype)[:, None, None]
        scale = images.shape[-2] * images.shape[-1] / patch**2
        return r + scale * (maps - r), {"scalar": [float(v) for v in r.flatten()]}

    return fn


def map_diagnostics(cnn: str, images: torch.Tensor, prompts: list[str], latent_hw: tuple[int, int],
                    patches=(1, 4, 8, 16)) -> dict:
    """How much of PXPO's advantage is local: maps of ``images`` on the latent grid (as the loop pools them),
    residuals after a per-position baseline over the batch (PXPO's), split into the scalar part (the map mean's
    residual, DDPO's) and the local rest. Per map: the std of the scalars, of the local part, and the local share
    of the residual variance (0: PXPO's advantages are DDPO's; the true map of an additive reward: near 1)."""
    from pxpo.core.advantages import to_latent_grid
    from pxpo.core.rewards import make_labeller

    base = {"base": f"{MODULE}:cnn_reward", "base_kwargs": {"path": cnn}, "fill": 0.5}
    lum = 0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]
    additive = torch.zeros_like(lum)
    additive[..., : lum.shape[-1] // 2] = 2 * lum[..., : lum.shape[-1] // 2]  # t's own map: mean t, per pixel
    maps = {"t's additive map (not learned)": additive}
    for patch in patches:
        with torch.no_grad():
            maps[f"attribution, patch {patch}"] = make_labeller("attribution", patch=patch, **base)(images, prompts)[0]
    with torch.no_grad():
        maps["density_attribution, patch 4"] = make_labeller(f"{MODULE}:density_attribution", patch=4, **base)(images, prompts)[0]
    out = {}
    for name, m in maps.items():
        m = to_latent_grid(m, latent_hw).double()
        r = m.mean(dim=(1, 2))
        resid = m - m.mean(0)
        local = resid - (r - r.mean())[:, None, None]
        out[name] = {"scalar_std": float(r.std()), "local_std": float(local.std()), "local_share": float(local.pow(2).mean() / resid.pow(2).mean())}
    return out


# --------------------------------------------------------------------------
# the runs


def variants(cnn: str, patch: int) -> dict[str, list[str]]:
    """Config overrides of each variant: the trained reward plus ``t`` as a weight-0 component (logged, not trained on)."""
    gold = {"name": f"{MODULE}:left_ink", "weight": 0.0}
    scalar = {"name": f"{MODULE}:cnn_reward", "kwargs": {"path": cnn}, "weight": 1.0}
    attributed = {"name": "attribution", "weight": 1.0, "kwargs": {"base": f"{MODULE}:cnn_reward", "base_kwargs": {"path": cnn},
                                                                    "method": "gradient", "patch": patch, "fill": 0.5}}
    density = {"name": f"{MODULE}:density_attribution", "weight": 1.0,
               "kwargs": {"base": f"{MODULE}:cnn_reward", "base_kwargs": {"path": cnn}, "patch": patch, "fill": 0.5}}
    return {
        "pxpo": ["train.algorithm=pxpo", "reward.components=" + json.dumps([attributed, gold])],
        "pxpo_density": ["train.algorithm=pxpo", "reward.components=" + json.dumps([density, gold])],
        "ddpo": ["train.algorithm=ddpo", "reward.components=" + json.dumps([scalar, gold])],
    }


def _one(job):
    name, seed, epochs, overrides, out = job
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    from pxpo.config import load_config
    from pxpo.stages.online import run_online
    from pxpo.tracking import JsonlTracker

    cfg = load_config(str(ROOT / "params.yaml"), [*overrides, f"seed={seed}", f"train.epochs={epochs}", f"output_dir={out}/{name}_s{seed}"])
    t0 = time.perf_counter()
    tracker = JsonlTracker(Path(cfg.output_dir))
    run_online(cfg, tracker, progress=False, resume=False)
    return name, seed, tracker.history(), time.perf_counter() - t0


def smoothed(history: list[dict], key: str = "reward_mean", k: int = SMOOTH) -> list[tuple[int, float]]:
    """``(samples_seen, mean of key over the k epochs ending there)`` for each epoch from the k-th on."""
    k = min(k, len(history))
    return [(history[i]["samples_seen"], sum(h[key] for h in history[i - k + 1 : i + 1]) / k) for i in range(k - 1, len(history))]


def samples_to_reach(history: list[dict], level: float) -> int | None:
    """Samples seen when the 3-epoch mean reward first reaches ``level`` (None: not within the budget)."""
    return next((n for n, v in smoothed(history) if v >= level), None)


def summarize(runs: dict, seeds: list[int]) -> dict:
    """Figures of the runs ``{"<variant>_s<seed>": {"history": [...], "wall_s": ...}}``; every variant against ``ddpo``."""
    first = {k: r["history"][0]["reward_mean"] for k, r in runs.items()}
    final = {k: smoothed(r["history"])[-1][1] for k, r in runs.items()}
    gain = {k: final[k] - first[k] for k in runs}
    final_ink = {k: smoothed(r["history"], "reward_left_ink")[-1][1] for k, r in runs.items()}
    gain_ink = {k: final_ink[k] - r["history"][0]["reward_left_ink"] for k, r in runs.items()}
    initial = sum(first.values()) / len(first)
    ddpo_gain = [gain[f"ddpo_s{s}"] for s in seeds if f"ddpo_s{s}" in gain]
    unit = sum(ddpo_gain) / len(ddpo_gain) if ddpo_gain else 0.0
    unit = unit if unit > 0 else max(gain.values())  # DDPO did not gain: levels on the best run's gain
    levels = {f"{f:g}": initial + f * unit for f in LEVEL_FRACTIONS}
    reach = {lv: {k: samples_to_reach(r["history"], v) for k, r in sorted(runs.items())} for lv, v in levels.items()}
    budget = max(r["history"][-1]["samples_seen"] for r in runs.values())
    n_ep = min(len(r["history"]) for r in runs.values())
    budgets = sorted({max(SMOOTH, round(n_ep * f)) for f in (0.25, 0.5, 0.75, 1.0)} & set(range(SMOOTH, n_ep + 1)))

    def gain_at(k, e):  # mean reward of the 3 epochs ending at epoch e (1-based) minus the first epoch's
        h = runs[k]["history"]
        return sum(x["reward_mean"] for x in h[e - SMOOTH : e]) / SMOOTH - h[0]["reward_mean"]

    efficiency, gain_ratio, at_samples = {}, {}, {}
    for v in sorted({r["variant"] for r in runs.values()} - {"ddpo"}):
        for s in seeds:
            px, dd = f"{v}_s{s}", f"ddpo_s{s}"
            if px not in runs or dd not in runs:
                continue
            # DDPO not there within the budget: the variant was at least budget / its samples times as efficient ("lower_bound")
            efficiency.setdefault(v, {})[f"s{s}"] = {
                lv: None if reach[lv][px] is None else {"ratio": (reach[lv][dd] or budget) / reach[lv][px], "lower_bound": reach[lv][dd] is None}
                for lv in levels}
            gain_ratio.setdefault(v, {})[f"s{s}"] = gain[px] / gain[dd] if gain[dd] > 0 else None
            at_samples.setdefault(v, {})[f"s{s}"] = {
                str(runs[px]["history"][e - 1]["samples_seen"]): (gain_at(px, e) / gain_at(dd, e) if gain_at(dd, e) > 0 else None) for e in budgets}
    return {
        "initial_reward": initial,
        "level_unit_mean_ddpo_gain": unit,
        "levels": levels,
        "first_epoch_reward": first,
        "final_reward_last3": final,
        "gain_last3_minus_first": gain,
        "left_ink_final_last3": final_ink,
        "left_ink_gain": gain_ink,
        "samples_to_reach": reach,
        "budget_samples": budget,
        "sample_efficiency_vs_ddpo": efficiency,  # variant -> seed -> level: DDPO's samples / the variant's
        "gain_ratio_vs_ddpo": gain_ratio,  # the variant's final gain / DDPO's, per seed
        "gain_ratio_vs_ddpo_at_samples": at_samples,  # the same after 25/50/75/100 % of the samples (3-epoch means)
        "wall_s": {k: r["wall_s"] for k, r in runs.items()},
    }


def plot(runs: dict, path: Path) -> None:
    from pxpo.plots import reward_curve

    reward_curve({k: r["history"] for k, r in runs.items()}, path, title="attribution maps vs the learned scalar")


def report(s: dict) -> None:
    """Print the figures of a summary."""
    print(f"initial reward {s['initial_reward']:.4f}; levels: first epoch + f x DDPO's mean gain ({s['level_unit_mean_ddpo_gain']:+.4f}); "
          f"{s['total_wall_s']:.0f}s in all")
    for k in s["final_reward_last3"]:
        print(f"{k:16s} final(last 3) {s['final_reward_last3'][k]:.4f}  gain {s['gain_last3_minus_first'][k]:+.4f}  "
              f"left ink gain {s['left_ink_gain'][k]:+.4f}  wall {s['wall_s'][k]:.0f}s")
    print("samples to first reach a level (3-epoch mean):")
    for lv, row in s["samples_to_reach"].items():
        print(f"  f={lv} ({s['levels'][lv]:.4f}): " + "  ".join(f"{k}={v}" for k, v in row.items()))
    for v, by_seed in s["sample_efficiency_vs_ddpo"].items():
        print(f"DDPO's samples / {v}'s samples to each level; final gain / DDPO's; gain / DDPO's at equal samples:")
        for seed, row in by_seed.items():
            print(f"  {seed}: " + "  ".join(f"f={lv}: " + ("-" if x is None else f"{'>=' if x['lower_bound'] else ''}{x['ratio']:.2f}")
                                            for lv, x in row.items())
                  + f";  gain {s['gain_ratio_vs_ddpo'][v][seed] or float('nan'):.2f};  at samples "
                  + ", ".join(f"{n}: {'-' if g is None else f'{g:.2f}'}" for n, g in s["gain_ratio_vs_ddpo_at_samples"][v][seed].items()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=["pxpo", "ddpo"], choices=["pxpo", "pxpo_density", "ddpo"])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--patch", type=int, default=4, help="the attribution's credit window (reward.kwargs.patch)")
    p.add_argument("--labelled", type=int, default=256, help="base samples the CNN is trained on (a quarter held out)")
    p.add_argument("--cnn-steps", type=int, default=600)
    p.add_argument("--base", default=None, help="the base model (default models/base, with --flow models/sd3)")
    p.add_argument("--flow", action="store_true", help="the tiny SD3 default (pxpo base build --arch sd3) with flow_benchmark.py's sampler")
    p.add_argument("--work", default=str(ROOT / "bench" / "results" / "runs" / "attribution"))
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "attribution_benchmark.json"))
    p.add_argument("--refresh", action="store_true",
                   help="no training: recompute the figures from the runs in --out's JSON and the map diagnostics from --work's samples and CNN")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    from pxpo.config import load_config
    from pxpo.stages.sample import sample
    from pxpo.trajectories import load_trajectories

    t_start = time.perf_counter()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    a.base = a.base or str(ROOT / "models" / ("sd3" if a.flow else "base"))
    if not (Path(a.base) / "model_index.json").is_file():
        print(f"no base model at {a.base}: run `pxpo base build{' --arch sd3' if a.flow else ''}` first", file=sys.stderr)
        return 2
    # the drift probe only logs: off, as in flow_benchmark.py
    common = [*(FLOW if a.flow else []), f"model.path={a.base}", "train.probe_every=0", *a.overrides]

    if a.refresh:
        summary = json.loads(Path(a.out).read_text())
        traj = load_trajectories(work / "labelled")
        summary["map_diagnostics"] = map_diagnostics(str(work / "cnn.pt"), traj.images, list(traj.prompts), tuple(traj.latents.shape[-2:]))
        summary.update(summarize(summary["runs"], summary["seeds"]))
        runs = summary.pop("runs")
        summary["runs"] = runs  # last in the file
        Path(a.out).write_text(json.dumps(summary, indent=2) + "\n")
        plot(runs, Path(a.out).with_suffix(".png"))
        report(summary)
        return 0

    # 1: the base model's samples, t, and the CNN
    cfg = load_config(str(ROOT / "params.yaml"), [*common, "seed=0", f"sample.num_batches={max(1, math.ceil(a.labelled / 32))}",
                                                  "sample.batch_size=32"])
    t0 = time.perf_counter()
    sample(cfg, work / "labelled", epoch=1000)
    traj = load_trajectories(work / "labelled")
    images = traj.images
    t_sample = time.perf_counter() - t0
    model, cnn = fit_cnn(images, steps=a.cnn_steps)
    cnn["sample_seconds"] = t_sample
    cnn_path = work / "cnn.pt"
    save_cnn(model, cnn_path)
    diag = map_diagnostics(str(cnn_path), images, list(traj.prompts), tuple(traj.latents.shape[-2:]))
    print(f"CNN: {len(images)} base samples in {t_sample:.0f}s, fit in {cnn['seconds']:.1f}s; held out: corr {cnn['heldout_corr']:.3f} "
          f"rmse {cnn['heldout_rmse']:.4f} (t std {cnn['heldout_t_std']:.4f}); augmented: corr {cnn['heldout_augmented_corr']:.3f}", flush=True)

    # 2: the runs
    table = variants(str(cnn_path), a.patch)
    jobs = [(v, s, a.epochs, [*common, *table[v]], str(work / "runs")) for s in a.seeds for v in a.variants]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=a.workers) as ex:
        results = list(ex.map(_one, jobs))
    runs = {f"{v}_s{s}": {"variant": v, "seed": s, "history": h, "wall_s": w} for v, s, h, w in results}

    # 3: figures
    summary = {
        "task": "learned scalar: a CNN trained on t = mean luminance of the left half of the tiny default's digits",
        "model": a.base, "flow": a.flow, "config": common,
        "epochs": a.epochs, "seeds": a.seeds, "threads_per_run": 1, "workers": a.workers,
        "attribution": {"method": "gradient", "patch": a.patch, "fill": 0.5}, "overrides": a.overrides,
        "kl_coef": cfg.train.kl_coef, "cnn": cnn, "map_diagnostics": diag, **summarize(runs, a.seeds),
        "runs_wall_s": time.perf_counter() - t0, "total_wall_s": time.perf_counter() - t_start, "runs": runs,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(runs, out.with_suffix(".png"))
    out.write_text(json.dumps(summary, indent=2) + "\n")
    report(summary)
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
