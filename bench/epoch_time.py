"""Time one epoch of the embedded default and the sampler's overhead; peak memory.

    python bench/epoch_time.py [--threads 2] [--repeats 3] [k=v overrides]

* epoch: sample (32 samples, 20 DDIM steps, CFG) + label + advantages +
  training pass, through the same functions ``pxpo run`` uses; the first epoch
  is a warm-up and is not counted.
* sampling overhead: wall time of ``sample_ddim`` (log-probs, every latent kept)
  divided by the wall time of the bare UNet calls it makes (same batch, same
  CFG-doubled inputs, same count), measured interleaved in one process.
* peak RSS of the process (ru_maxrss).

Writes bench/results/epoch_time.json. Targets: epoch < 25 s on 2 CPU cores,
peak memory < 2 GB, overhead < 1.15.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="bench/results/epoch_time.json")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)

    import torch

    torch.set_num_threads(a.threads)
    from pxpo.config import load_config
    from pxpo.core.rewards import make_labeller
    from pxpo.core.advantages import PerPromptStatTracker
    from pxpo.core.sampling import encode_prompts, sample_ddim
    from pxpo.prompts import draw_prompts, load_prompts
    from pxpo.training.rollout import label_images, sample_seed, sample_trajectories
    from pxpo.training.loop import compute_advantages, train_on_trajectories
    from pxpo.training.state import build_train_state

    params = "params.yaml" if Path("params.yaml").exists() else None
    cfg = load_config(params, a.overrides)
    pipe, state = build_train_state(cfg)
    labeller = make_labeller(cfg.reward.name, **cfg.reward.kwargs)
    tracker = PerPromptStatTracker(cfg.train.buffer_size, cfg.train.min_count, cfg.train.baseline)
    prompts_all = load_prompts(cfg.prompts.source)
    n = cfg.sample.batch_size * cfg.sample.num_batches
    size = pipe.unet.config.sample_size
    phases = {"sample": [], "label": [], "train": [], "epoch": []}
    for epoch in range(a.repeats + 1):
        prompts = draw_prompts(prompts_all, n, sample_seed(cfg.seed, epoch, 0, 0))
        seeds = [sample_seed(cfg.seed, epoch, 0, i) for i in range(n)]
        t0 = time.perf_counter()
        traj = sample_trajectories(pipe, cfg, prompts, seeds)
        t1 = time.perf_counter()
        maps, _ = label_images(labeller, traj.images, traj.prompts)
        adv = compute_advantages(tracker, traj.prompts, maps, (size, size), cfg.train.algorithm)
        t2 = time.perf_counter()
        train_on_trajectories(state, traj, adv, cfg, epoch)
        t3 = time.perf_counter()
        if epoch > 0:
            phases["sample"].append(t1 - t0)
            phases["label"].append(t2 - t1)
            phases["train"].append(t3 - t2)
            phases["epoch"].append(t3 - t0)
        print(f"epoch {epoch}{' (warm-up)' if epoch == 0 else ''}: sample {t1 - t0:.2f}s label {t2 - t1:.3f}s train {t3 - t2:.2f}s")

    # Sampling overhead vs bare UNet calls (same batch), interleaved.
    unet = pipe.unet
    unet.eval()
    s = cfg.sample
    with torch.no_grad():
        cond = encode_prompts(pipe.tokenizer, pipe.text_encoder, draw_prompts(prompts_all, s.batch_size, 0))
        neg = encode_prompts(pipe.tokenizer, pipe.text_encoder, [cfg.prompts.negative_prompt])
        shape = (unet.config.in_channels, size, size)
        pipe.scheduler.set_timesteps(s.num_steps)
        ts = pipe.scheduler.timesteps
        x = torch.randn(2 * s.batch_size, *shape)
        emb = torch.cat([neg.expand(s.batch_size, -1, -1), cond])
        full, bare = [], []
        for r in range(a.repeats + 1):
            t0 = time.perf_counter()
            sample_ddim(unet, pipe.scheduler, cond, neg, latent_shape=shape, num_steps=s.num_steps, eta=s.eta,
                        guidance_scale=s.guidance_scale, generator=[torch.Generator().manual_seed(i) for i in range(s.batch_size)])
            t1 = time.perf_counter()
            for t in ts:
                unet(x, t.expand(2 * s.batch_size), encoder_hidden_states=emb)
            t2 = time.perf_counter()
            if r > 0:
                full.append(t1 - t0)
                bare.append(t2 - t1)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res = {
        "threads": a.threads,
        "samples_per_epoch": n,
        "num_steps": s.num_steps,
        "guidance_scale": s.guidance_scale,
        "train_batch_size": cfg.train.batch_size,
        "use_lora": cfg.train.use_lora,
        "epoch_seconds_median": statistics.median(phases["epoch"]),
        "phase_seconds_median": {k: statistics.median(v) for k, v in phases.items() if k != "epoch"},
        "sampling_seconds_median": statistics.median(full),
        "bare_unet_seconds_median": statistics.median(bare),
        "sampling_overhead_ratio": statistics.median(full) / statistics.median(bare),
        "peak_rss_mb": peak_mb,
        "targets": {"epoch_seconds": 25, "peak_rss_mb": 2048, "sampling_overhead_ratio": 1.15},
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    sys.exit(main())
