"""Guardrails of the training loop: skipped steps, a stop with rollback, and the drift probe.

* :class:`StepGuard` decides, at every optimizer step, whether to apply it.
  A non-finite loss (in any micro-batch of the accumulation window) or a
  non-finite gradient norm skips the step (the gradients are zeroed) and is
  counted; after ``train.max_skipped_steps`` skipped steps, or a gradient norm
  above ``train.grad_spike_factor`` times the running median of the last 50
  applied steps, it raises :class:`TrainingStopped`. The decision uses the
  gradient after DDP's all-reduce, so every process makes the same one.
* :func:`rollback` restores the newest checkpoint (or the stage's input
  state) into the optimisation state and forgets the metrics logged after it,
  so the run directory is exactly as that checkpoint left it and ``pxpo run``
  resumes from there: nothing saved is lost, nothing diverged is kept.
* :class:`DriftProbe` samples a fixed probe batch (the same prompts and seeds
  every time) every ``train.probe_every`` epochs and logs the drift from the
  base model, as ``pxpo evaluate`` measures it (:func:`pxpo.evaluate.drift_metrics`),
  and the base-vs-policy grid of those samples (:meth:`DriftProbe.grid`).
* :class:`RatioHealth` checks the importance ratio where it must be 1: on the
  first update of each epoch the weights are the ones that sampled, so
  ``exp(logp - logp_old)`` differs from 1 only by rounding. It logs the worst
  per-element ``|ratio - 1|`` (``ratio_dev_max``), warns once above a
  tolerance that fits the precision, and stops the run above a hard limit:
  a trainer that does not recompute the sampler's log-probs (another
  precision, guidance scale, scheduler config, dropout left on) turns PPO's
  clip into noise without any other symptom.
"""

from __future__ import annotations

import json
import math
import statistics
import warnings
from collections import deque
from pathlib import Path

import torch

from ..errors import PxpoInputError


PROBE_STREAM = 997
# Worst per-element |ratio - 1| on the first update, by precision (train.mixed_precision as Accelerate resolves it):
# (warn, stop). fp32 rounding of a recomputed step stays far below the warning; half precision rounds the
# network output to ~1e-3 (fp16) or ~1e-2 (bf16) relative, and a small-std step turns that into large log-ratios.
# TF32 matmuls (CUDA, fp32 weights) keep fp16's 10-bit mantissa: fp16's limits. The half-precision figures are
# conservative guesses, not yet measured on a GPU (fp32 on CPU: exactly 0 in the tests and the default run).
RATIO_LIMITS = {"no": (1e-2, 0.5), "tf32": (0.2, 10.0), "fp16": (0.2, 10.0), "bf16": (0.5, 50.0)}


class TrainingStopped(PxpoInputError):
    """The loop stopped on a guardrail; the CLI prints the message and exits 3."""

    exit_code = 3


class StepGuard:
    """Per-step checks of one run (see the module docstring).

    Args:
        max_skipped: skipped steps allowed before the run stops (0: the first stops it).
        spike_factor: stop when grad_norm > spike_factor * running median (0: off).
        window: applied steps in the running median.
        min_history: applied steps needed before spikes are checked.
    """

    def __init__(self, max_skipped: int = 5, spike_factor: float = 100.0, window: int = 50, min_history: int = 10):
        self.max_skipped = max_skipped
        self.spike_factor = spike_factor
        self.min_history = min_history
        self.norms: deque[float] = deque(maxlen=window)
        self.skipped = 0

    @classmethod
    def from_config(cls, train_cfg) -> StepGuard:
        return cls(train_cfg.max_skipped_steps, train_cfg.grad_spike_factor)

    def check(self, grad_norm: float, loss_finite: bool, where: str) -> bool:
        """True: apply the step. False: skip it (counted). Raises :class:`TrainingStopped`."""
        if not (loss_finite and torch.isfinite(torch.tensor(grad_norm)).item()):
            self.skipped += 1
            if self.skipped > self.max_skipped:
                raise TrainingStopped(
                    where,
                    f"{self.skipped} optimizer steps had a non-finite loss or gradient (limit train.max_skipped_steps={self.max_skipped})",
                    "lower train.learning_rate or train.clip_range, check the reward maps, then resume with `pxpo run` "
                    "(it continues from the checkpoint the run was rolled back to)",
                )
            return False
        if self.spike_factor > 0 and len(self.norms) >= self.min_history:
            median = statistics.median(self.norms)
            if grad_norm > self.spike_factor * median:
                raise TrainingStopped(
                    where,
                    f"gradient norm {grad_norm:.3g} is {grad_norm / median:.0f}x its running median {median:.3g} "
                    f"(limit train.grad_spike_factor={self.spike_factor:g})",
                    "lower train.learning_rate or train.max_log_ratio, or raise train.grad_spike_factor if such spikes are expected, "
                    "then resume with `pxpo run`",
                )
        self.norms.append(grad_norm)
        return True


def rollback(state, run_dir: Path, tracker, err: TrainingStopped, init_state: Path | None = None) -> TrainingStopped:
    """Restore the newest checkpoint (else ``init_state``) into ``state``; return the error to raise.

    The tracker forgets the epochs after the restored point, so metrics and
    checkpoint agree; the message names what was restored.
    """
    from .state import latest_checkpoint

    acc = state.accelerator
    ck = latest_checkpoint(run_dir)
    if ck is not None:
        acc.load_state(str(ck))
        done = json.loads((ck / "pxpo_epoch.json").read_text())["completed_epochs"]
        where = f"rolled back to checkpoint {ck} (epoch {done}); `pxpo run` resumes from it"
    elif init_state is not None:
        acc.load_state(str(Path(init_state) / "state"))
        done = json.loads((Path(init_state) / "pxpo_round.json").read_text())["completed_rounds"]
        where = f"rolled back to the input state {init_state} (epoch {done}); nothing of this pass was written"
    else:
        done = 0
        where = "no checkpoint yet: nothing of this run was saved (train.save_every sets how often one is written)"
    if acc.is_main_process:
        tracker.truncate(done)
    return TrainingStopped(err.what, f"{err.problem}; {where}", err.fix)


class DriftProbe:
    """Drift of the policy from the base model on a fixed probe batch.

    Args:
        prompts, seeds: the probe batch (K prompts, one seed each), fixed for the run.
        base: (images (K, 3, H, W), final latents (K, C, h, w)) of the base model.
        every: probe after epochs e with (e + 1) % every == 0.
    """

    def __init__(self, prompts: list[str], seeds: list[int], base: tuple[torch.Tensor, torch.Tensor], every: int):
        self.prompts, self.seeds, self.base, self.every = prompts, seeds, base, every

    @classmethod
    def build(cls, cfg, pipe, state, prompt_source, run_dir: Path, fresh: bool, previous: Path | None = None) -> DriftProbe | None:
        """The run's probe, or None when ``train.probe_every`` is 0 or the base samples are unavailable.

        The base samples are computed once and cached in
        ``<run_dir>/probe_base.safetensors``: with LoRA by disabling the
        adapter, with full fine-tuning only on a fresh start (weights = base)
        or from the ``previous`` stage output's cache.
        """
        from safetensors.torch import load_file, save_file

        from .rollout import sample_seed

        t = cfg.train
        if t.probe_every <= 0:
            return None
        # fixed per run; a stream of seeds the training samples (stream 0) never use
        prompts = prompt_source.draw(t.probe_samples, sample_seed(cfg.seed, 0, PROBE_STREAM, 0))
        seeds = [sample_seed(cfg.seed, 0, PROBE_STREAM, i) for i in range(t.probe_samples)]
        cache = Path(run_dir) / "probe_base.safetensors"
        for found in (cache, Path(previous) / cache.name if previous else None):
            if found is not None and found.is_file():
                d = load_file(str(found))
                if found != cache and state.accelerator.is_main_process:
                    Path(run_dir).mkdir(parents=True, exist_ok=True)
                    save_file(d, str(cache))
                return cls(prompts, seeds, (d["images"], d["latents"]), t.probe_every)
        unet = state.accelerator.unwrap_model(state.unet)
        if t.use_lora:
            unet.disable_adapters()
            try:
                base = _probe_samples(pipe, unet, cfg, prompts, seeds)
            finally:
                unet.enable_adapters()
        elif fresh:
            base = _probe_samples(pipe, unet, cfg, prompts, seeds)
        else:
            print(f"drift probe off: no {cache} and full fine-tuning (the base model's samples are not recoverable)", flush=True)
            return None
        if state.accelerator.is_main_process:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            save_file({"images": base[0].contiguous(), "latents": base[1].contiguous()}, str(cache))
        return cls(prompts, seeds, base, t.probe_every)

    def due(self, epoch: int) -> bool:
        return (epoch + 1) % self.every == 0

    def sample(self, pipe, state, cfg) -> tuple[torch.Tensor, torch.Tensor]:
        """(images (K, 3, H, W), final latents (K, C, h, w)) of the current policy on the probe batch."""
        return _probe_samples(pipe, state.accelerator.unwrap_model(state.unet), cfg, self.prompts, self.seeds)

    def drift(self, images: torch.Tensor, latents: torch.Tensor) -> dict:
        """{"probe_drift_pixel_l1", "probe_drift_latent_rms"} of policy samples (:meth:`sample`) from the base's."""
        from ..evaluate import drift_metrics

        return {f"probe_{k}": v for k, v in drift_metrics(self.base[0], images, self.base[1], latents).items()}

    def grid(self, images: torch.Tensor, epoch: int):
        """Base (the cached samples, row ``base``) above the policy's ``images`` (row ``policy, epoch N``), same
        prompts and seeds, as one PIL image (:func:`pxpo.plots.labelled_grid_image`; images under 64 pixels upscaled)."""
        from ..plots import labelled_grid_image

        blocks = {"base": self.base[0], f"policy, epoch {epoch}": images}
        return labelled_grid_image(blocks, nrow=min(8, len(self.prompts)), scale=max(1, 64 // images.shape[-2]))


def _probe_samples(pipe, unet, cfg, prompts, seeds) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (K, 3, H, W), final latents (K, C, h, w)) sampled with ``unet``."""
    from .rollout import sample_trajectories

    pipe.unet = unet
    with torch.no_grad():
        traj = sample_trajectories(pipe, cfg, prompts, seeds, progress=False, pairs=False)  # independent probe samples
    return traj.images.float(), traj.latents[:, -1].float()


class RatioHealth:
    """The importance ratio on the first update of each epoch (see the module docstring).

    Args:
        warn: warn once per run when the worst per-element ``|ratio - 1|`` exceeds this.
        stop: raise :class:`TrainingStopped` when it exceeds this.
        precision: named in the messages (``no`` = fp32, ``fp16``, ``bf16``).

    Use: :meth:`start_epoch`; :meth:`observe` every re-scored batch (it only counts
    until :meth:`first_update` is called); :meth:`first_update` right before the
    epoch's first optimizer step (stops the run before a mismatched step is taken);
    :meth:`metrics` for the epoch's log.
    """

    def __init__(self, warn: float, stop: float, precision: str = "no"):
        self.warn, self.stop, self.precision = warn, stop, precision
        self.worst, self.active, self.warned = 0.0, True, False
        self._dev: torch.Tensor | None = None  # the running max on the device (read once, by first_update)

    @classmethod
    def from_config(cls, train_cfg, precision: str) -> RatioHealth:
        warn, stop = RATIO_LIMITS.get(precision, RATIO_LIMITS["no"])
        warn = train_cfg.ratio_warn if train_cfg.ratio_warn is not None else warn
        stop = train_cfg.ratio_stop if train_cfg.ratio_stop is not None else stop
        return cls(warn, max(stop, warn), precision)

    def start_epoch(self) -> None:
        self.worst, self.active, self._dev = 0.0, True, None

    def observe(self, log_prob: torch.Tensor, old_log_prob: torch.Tensor) -> None:
        """Per-element log-probs (B, ...) re-scored now and stored at sampling time."""
        if self.active:
            dev = torch.expm1(log_prob.detach().double() - old_log_prob.detach().double()).abs().max()
            dev = torch.where(torch.isfinite(dev), dev, torch.full_like(dev, math.inf))  # NaN counts as the worst
            self._dev = dev if self._dev is None else torch.maximum(self._dev, dev)

    def first_update(self, where: str, reduce=None) -> float:
        """End of the first update's window: check the worst deviation; stop observing. Returns it.

        ``reduce``: maps a float to the max over processes (every process then decides the same).
        """
        if not self.active:
            return self.worst
        self.active = False
        self.worst = float(self._dev) if self._dev is not None else 0.0  # one host read per epoch
        if reduce is not None:
            self.worst = float(reduce(self.worst))
        if not math.isfinite(self.worst) or self.worst > self.stop:
            raise TrainingStopped(
                where,
                f"the importance ratio is off by {self.worst:.3g} on the first update (worst element; limit {self.stop:g} for "
                f"precision {self.precision!r}, train.ratio_stop), although the weights are the ones that sampled: "
                "training does not recompute the sampler's log-probs",
                "make training score steps exactly as sampling did: the same precision (train.mixed_precision, model.dtype), "
                "guidance scale (sample.guidance_scale) and negative prompt, the same scheduler config, and no dropout left on; "
                "raise train.ratio_stop only if this precision needs it",
            )
        if self.worst > self.warn and not self.warned:
            self.warned = True
            warnings.warn(
                f"{where}: the importance ratio is off by {self.worst:.3g} on the first update (worst element; tolerance {self.warn:g} "
                f"for precision {self.precision!r}, train.ratio_warn): PPO's clip acts on rounding noise; check precision, guidance "
                "and scheduler settings (warned once per run)",
                stacklevel=2,
            )
        return self.worst

    def metrics(self) -> dict:
        """``{"ratio_dev_max": worst |ratio - 1| on this epoch's first update}``."""
        return {"ratio_dev_max": self.worst}


def process_max(acc):
    """The ``reduce`` of :meth:`RatioHealth.first_update` for ``acc``: the max over processes (None: one process)."""
    if acc.num_processes == 1:
        return None
    return lambda v: float(acc.gather(torch.tensor([v], dtype=torch.float64, device=acc.device)).max())


def precision_of(acc, net) -> str:
    """The precision the network computes in: Accelerate's mixed precision, else its weights' (``no`` = fp32, ``tf32`` on CUDA with TF32)."""
    if acc.mixed_precision in ("fp16", "bf16"):
        return acc.mixed_precision
    dtypes = {p.dtype for p in net.parameters()}
    if torch.float16 in dtypes or torch.bfloat16 in dtypes:
        return "fp16" if torch.float16 in dtypes else "bf16"
    return "tf32" if acc.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32 else "no"
