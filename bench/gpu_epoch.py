"""One SD-1.5-shaped epoch on a GPU: pxpo's sampling and training times against the bare-UNet floor (issue 9 item 6).

    python bench/gpu_epoch.py [--model DIR] [--epochs 2] [--out bench/results/gpu_epoch.json] [k=v ...]
    python bench/gpu_epoch.py --tiny --out /tmp/x.json          # the tiny shape (the default without CUDA)

The workload of issue 9: a random-weight pipeline with SD 1.5's component
configs (``pxpo base random --arch sd15``; built into --model if missing),
512 px (64x64x4 latents), 32 samples x 50 DDIM steps, guidance 5, LoRA rank 4,
lr 3e-4, fp16 mixed precision, sample.batch_size 8 x 4 batches,
train.batch_size 4, compute batches ``auto``. Each epoch runs the functions
``pxpo run`` runs (:func:`pxpo.training.rollout.sample_trajectories`,
:func:`pxpo.training.rollout.label_images`, :func:`pxpo.training.loop.compute_advantages`,
:func:`pxpo.training.loop.train_on_trajectories`) on the state
:func:`pxpo.training.state.build_train_state` builds from the config, so it
measures pxpo, not a copy. The first epoch is a warm-up (kernel selection,
``auto`` compute-batch measurement, torch.compile); the last is reported.

The floor: the same UNet work with nothing else, timed at several compute
batches in the same process after the epochs: guided sampling calls (2k rows
for k samples, no grad) and guided training calls (forward and backward
through the LoRA weights, 2k rows for k (sample, timestep) pairs), under the
same autocast. floor = N*T * min over k of (seconds per sample-step) +
N*T_trained * min over k of (seconds per pair). Sizes that run out of memory
are skipped.

Reported as JSON: per-epoch sample / label / train seconds, the floor and its
best compute batches, epoch / floor, peak GPU memory (torch's max allocated
and reserved in the reported epoch), GPU utilisation during the reported epoch
(pynvml if importable, else ``nvidia-smi`` polled in a thread, else null).
Targets (issue 9): epoch <= 50 s on one H100, <= 1.25 x the floor.

Without CUDA (or with --tiny) the tiny random pipeline runs a tiny shape
(4 samples x 3 steps) so that the script can be smoke-tested on CPU
(tests/test_bench_gpu_epoch.py); its figures are not a benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SD15 = [
    "sample.num_steps=50",
    "sample.guidance_scale=5.0",
    "sample.batch_size=8",
    "sample.num_batches=4",
    "train.batch_size=4",
    "train.use_lora=true",
    "train.lora_rank=4",
    "train.lora_alpha=4.0",
    "train.learning_rate=3e-4",
    "train.clip_range=1e-4",
    "train.mixed_precision=fp16",
    "model.dtype=float16",
    "train.save_every=1000",
]
TINY = [
    "sample.num_steps=3",
    "sample.guidance_scale=3.0",
    "sample.batch_size=4",
    "sample.num_batches=1",
    "train.batch_size=2",
    "train.use_lora=true",
    "train.learning_rate=3e-4",
    "train.save_every=1000",
]
SAMPLE_BATCHES = (8, 16, 32)  # samples per sampling call (2x rows under guidance)
TRAIN_BATCHES = (4, 8, 16, 32)  # (sample, timestep) pairs per training call
TINY_BATCHES = (1, 2, 4)


class GpuUtilisation:
    """Samples the GPU's utilisation (percent) in a thread: pynvml, else ``nvidia-smi``; ``source`` None if neither."""

    def __init__(self, index: int = 0, period: float = 0.2):
        self.index, self.period, self.samples = index, period, []
        self.source, self._stop, self._thread = None, threading.Event(), None
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._read = lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            self.source = "pynvml"
        except Exception:  # noqa: BLE001 -- not installed / no driver: try the CLI
            smi = shutil.which("nvidia-smi")
            if smi:
                cmd = [smi, f"--id={index}", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
                self._read = lambda: float(subprocess.run(cmd, capture_output=True, text=True, timeout=5).stdout.strip().splitlines()[0])
                self.source, self.period = "nvidia-smi", max(period, 0.5)

    def _loop(self):
        while not self._stop.is_set():
            try:
                self.samples.append(self._read())
            except Exception:  # noqa: BLE001 -- a failed read is a missing sample
                pass
            self._stop.wait(self.period)

    def __enter__(self):
        if self.source:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)

    def summary(self) -> dict | None:
        if not self.source or not self.samples:
            return None
        s = sorted(self.samples)
        return {"source": self.source, "mean_percent": sum(s) / len(s), "median_percent": s[len(s) // 2], "samples": len(s)}


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_calls(fn, device, repeats: int) -> float:
    """Median seconds of ``fn()`` after one warm-up call."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def unet_floor(state, traj, cfg, batches, repeats: int) -> dict:
    """Seconds per sample-step (sampling) and per pair (training) of bare guided UNet calls, per compute batch.

    Sampling: no grad, weights' dtype inputs (as the rollout). Training: under
    the accelerator's autocast, forward + backward into the LoRA weights. The
    inputs are the epoch's own latents, timesteps and prompt embeddings.
    """
    import torch

    from pxpo.training.compute_batch import is_oom
    from pxpo.core.policy import Cond, base_network

    acc, unet, policy = state.accelerator, state.unet, state.policy
    base = base_network(unet)
    device = acc.device
    n, t_steps = traj.latents.shape[0], traj.timesteps.shape[0]
    cond_all = traj.cond().to(device)
    uncond = traj.uncond().to(device)
    out = {"sampling_s_per_sample_step": {}, "training_s_per_pair": {}}
    g = torch.Generator().manual_seed(0)
    for k in batches:
        idx = torch.randint(0, n, (k,), generator=g)
        j = torch.randint(0, t_steps, (k,), generator=g)
        x = traj.latents[idx, j].to(device)
        cond = cond_all.index(idx.to(device))
        try:
            den_s = policy.denoiser(base, base.dtype)

            def sample_call():
                with torch.no_grad():
                    den_s(x, traj.timesteps[j].to(device), cond, uncond, cfg.sample.guidance_scale)

            out["sampling_s_per_sample_step"][k] = _time_calls(sample_call, device, repeats) / k
        except Exception as err:  # noqa: BLE001
            if not is_oom(err):
                raise
            out["sampling_s_per_sample_step"][k] = None
        try:
            den_t = policy.denoiser(unet)

            def train_call():
                with acc.autocast():
                    pred = den_t(x, traj.timesteps[j].to(device), cond, uncond, cfg.sample.guidance_scale)
                pred.float().square().mean().backward()
                state.optimizer.zero_grad(set_to_none=True)

            out["training_s_per_pair"][k] = _time_calls(train_call, device, repeats) / k
        except Exception as err:  # noqa: BLE001
            if not is_oom(err):
                raise
            state.optimizer.zero_grad(set_to_none=True)
            out["training_s_per_pair"][k] = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def tiny_model(dest: Path) -> str:
    from pxpo.embedded.architecture import make_tiny_pipeline

    if not (dest / "model_index.json").exists():
        make_tiny_pipeline(seed=0).save_pretrained(dest)
    return str(dest)


def sd15_model(dest: Path) -> str:
    if not (dest / "model_index.json").exists():
        from pxpo.embedded.random_sd import save_random_pipeline

        save_random_pipeline(dest, "sd15", dtype="float16", seed=0)
    return str(dest)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="pipeline dir (default: the SD 1.5-shaped random fixture, built at $TMPDIR/pxpo_sd15)")
    p.add_argument("--tiny", action="store_true", help="the tiny shape (the default without CUDA)")
    p.add_argument("--epochs", type=int, default=2, help="epochs; the first is a warm-up, the last is reported")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per compute batch of the floor")
    p.add_argument("--out", default="bench/results/gpu_epoch.json")
    p.add_argument("overrides", nargs="*", help="config overrides, k=v, after the workload's")
    a = p.parse_args(argv)

    import torch

    cuda = torch.cuda.is_available()
    tiny = a.tiny or not cuda
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

    from pxpo.config import load_config
    from pxpo.labellers import make_reward
    from pxpo.core.advantages import PerPromptStatTracker
    from pxpo.prompts import PromptSource
    from pxpo.training.rollout import label_images, sample_seed, sample_trajectories
    from pxpo.training.loop import compute_advantages, train_on_trajectories
    from pxpo.training.state import build_train_state

    t_build = time.perf_counter()
    tmp = Path(tempfile.gettempdir())
    model = a.model or (tiny_model(tmp / "pxpo_tiny_bench") if tiny else sd15_model(tmp / "pxpo_sd15"))
    out_dir = tmp / "pxpo_gpu_epoch_run"
    overrides = [f"model.path={model}", f"output_dir={out_dir}", *(TINY if tiny else SD15), *a.overrides]
    cfg = load_config(None, overrides)
    pipe, state = build_train_state(cfg)
    labeller = make_reward(cfg.reward)
    prompts_src = PromptSource.load(cfg.prompts.source)
    tracker = PerPromptStatTracker(cfg.train.buffer_size, cfg.train.min_count, cfg.train.baseline)
    device = state.accelerator.device
    t_build = time.perf_counter() - t_build
    n = cfg.sample.batch_size * cfg.sample.num_batches

    epochs, util, peak, logs = [], None, {}, {}
    for epoch in range(a.epochs):
        last = epoch == a.epochs - 1
        if cuda:
            _sync(device)
            torch.cuda.reset_peak_memory_stats(device)
        meter = GpuUtilisation(device.index or 0) if (cuda and last) else None
        with meter if meter is not None else _nullctx():
            prompts = prompts_src.draw(n, sample_seed(cfg.seed, epoch, 0, 0))
            seeds = [sample_seed(cfg.seed, epoch, 0, i) for i in range(n)]
            t0 = time.perf_counter()
            with state.accelerator.autocast():  # as pxpo.training.loop.run
                traj = sample_trajectories(pipe, cfg, prompts, seeds, batch_size=cfg.sample.batch_size, policy=state.policy, compute=state.sample_compute)
            _sync(device)
            t1 = time.perf_counter()
            maps, _ = label_images(labeller, traj.images, traj.prompts)
            adv = compute_advantages(tracker, list(traj.prompts), maps, tuple(traj.latents.shape[-2:]), cfg.train.algorithm)
            t2 = time.perf_counter()
            logs = train_on_trajectories(state, traj, adv, cfg, epoch)
            _sync(device)
            t3 = time.perf_counter()
        e = {"epoch": epoch, "sample_s": t1 - t0, "label_s": t2 - t1, "train_s": t3 - t2, "epoch_s": t3 - t0}
        e["compute_batch"] = {"sample": state.sample_compute.size, "train": state.train_compute.size}
        epochs.append(e)
        print(f"epoch {epoch}{' (warm-up)' if not last else ''}: sample {e['sample_s']:.2f}s label {e['label_s']:.3f}s train {e['train_s']:.2f}s", flush=True)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)  # partial figures survive a time limit
        Path(a.out).write_text(json.dumps({"partial": True, "overrides": overrides, "build_s": t_build, "epochs": epochs}, indent=1, default=str))
        if cuda and last:
            peak = {"max_allocated_gb": torch.cuda.max_memory_allocated(device) / 2**30, "max_reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30}
            util = meter.summary()

    batches = TINY_BATCHES if tiny else None
    s_batches = batches or SAMPLE_BATCHES
    t_batches = batches or TRAIN_BATCHES
    sf = unet_floor(state, traj, cfg, sorted(set(s_batches) | set(t_batches)), a.repeats)
    per_s = {k: v for k, v in sf["sampling_s_per_sample_step"].items() if v is not None and k in s_batches}
    per_t = {k: v for k, v in sf["training_s_per_pair"].items() if v is not None and k in t_batches}
    t_steps = traj.timesteps.shape[0]
    n_pairs = logs.get("pairs") or n * max(1, int(len(state.policy.trained_steps) * cfg.train.timestep_fraction))
    best_s, best_t = min(per_s, key=per_s.get), min(per_t, key=per_t.get)
    floor = {
        "sampling_s": n * t_steps * per_s[best_s],
        "training_s": n_pairs * per_t[best_t],
        "best_sample_compute_batch": best_s,
        "best_train_compute_batch": best_t,
        **sf,
    }
    floor["total_s"] = floor["sampling_s"] + floor["training_s"]
    rep = epochs[-1]
    result = {
        "workload": "tiny smoke shape (not a benchmark)" if tiny else "SD 1.5-shaped random pipeline, 512 px, 32 x 50 DDIM steps, guidance 5, LoRA r4, fp16",
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "overrides": overrides,
        "samples": n,
        "steps": t_steps,
        "build_s": t_build,
        "epochs": epochs,
        "reported": rep,
        "train_logs": {k: v for k, v in logs.items() if isinstance(v, (int, float))},
        "floor": floor,
        "epoch_over_floor": rep["epoch_s"] / floor["total_s"],
        "peak_gpu_memory": peak or None,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "gpu_utilisation": util,
        "targets": {"epoch_s_max": 50.0, "epoch_over_floor_max": 1.25},
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(
        f"reported epoch {rep['epoch_s']:.2f}s (sample {rep['sample_s']:.2f}s, train {rep['train_s']:.2f}s); "
        f"floor {floor['total_s']:.2f}s (sample batch {best_s}, train batch {best_t}); epoch/floor {result['epoch_over_floor']:.2f}; "
        f"peak {peak.get('max_allocated_gb', float('nan')) if peak else float('nan'):.2f} GB; util {util['mean_percent'] if util else None} -> {out}",
        flush=True,
    )
    return 0


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    sys.exit(main())
