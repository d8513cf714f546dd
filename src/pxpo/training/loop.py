"""The training loop: sample -> label -> advantages -> train, for N epochs.

One epoch, top to bottom (:func:`run`):

1. SAMPLING: draw prompts, roll out the current policy (``state.policy``, a
   :class:`pxpo.core.policy.Policy`: stochastic DDIM, LCM, ...) with
   classifier-free guidance, keep every latent and per-element log-prob
   (:func:`pxpo.training.rollout.sample_trajectories`), ``sample.compute_batch``
   samples per UNet call.
2. LABELLING: decode x_0, score with the reward labeller -> maps (N, H, W)
   (:func:`pxpo.training.rollout.label_images`).
3. ADVANTAGES: map to the latent grid and normalise per prompt
   (:func:`compute_advantages`); DDPO uses each map's mean as its scalar.
4. TRAINING: shuffle samples, permute the policy's trained transitions per
   sample, re-score the stored actions under the current weights
   (``policy.log_prob``), PXPO or DDPO loss; an optimizer step's (sample,
   timestep) pairs are computed ``train.compute_batch`` per UNet call and
   summed, the grad norm clipped, one host read per step
   (:func:`train_on_trajectories`, :mod:`pxpo.training.step`).
5. LOGGING: the epoch's metrics to the tracker; every ``train.probe_every``
   epochs the drift probe's metrics and two images at the epoch's step: the
   probe batch's base-vs-policy grid and the mean reward map
   (:func:`log_epoch_images`).

The loop holds one policy object and never asks which sampler it is.

The loop receives its collaborators (pipeline and :class:`TrainState`,
labeller, prompt source, tracker), as trl's trainers do; the stages
(:mod:`pxpo.stages.online`, :mod:`pxpo.stages.train`) build them from the
config. ``pxpo sample`` / ``label`` / ``train`` run the same steps on
artifacts on disk; ``pxpo run`` runs them in one process.

Several processes (``pxpo run --processes N``: torchrun, gloo on CPU, NCCL on
GPUs) give the run one process gives, up to float summation order: sample i
of an epoch has the same prompt and noise for any N, each process rolls out
and trains on its block, the reward maps are gathered once for the per-prompt
statistics, and DDP averages the gradients of each global micro-batch
(:mod:`pxpo.training.distributed`, docs/distributed.md).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..config import Config
from ..errors import PxpoInputError
from ..core.advantages import GroupRelative, PerPromptStatTracker, to_latent_grid
from ..core.sampling import latent_hw as latent_grid
from ..core.rewards import component_means
from .guardrails import DriftProbe, RatioHealth, StepGuard, TrainingStopped, precision_of, rollback
from .distributed import global_advantages, mean_over_processes, micro_batches, shard
from ..prompts import PromptSource
from .rollout import label_images, sample_seed, sample_trajectories
from ..tracking import Tracker
from .state import TrainState, latest_checkpoint, save_checkpoint, save_policy
from .objectives import Objective, make_objective, objective_class
from .step import EpochData, StepRunner
from ..trajectories import Trajectories


def compute_advantages(
    tracker: PerPromptStatTracker, prompts: list[str], maps: torch.Tensor, latent_hw: tuple[int, int], algorithm: str | Objective,
    *, preference_scale: float = 1.0, preferences: torch.Tensor | None = None,
) -> torch.Tensor:
    """Advantages from reward maps (N, H, W).

    Per-position objectives (PXPO, pixel-wise NFT): maps area-averaged to the latent grid,
    per-position statistics -> (N, h, w). Per-sample ones (DDPO, scalar NFT): each map's
    mean as the scalar reward -> (N,). ``algorithm``: the objective or its ``train.algorithm``
    name. ``tracker``: per-prompt buffers, or GRPO's :class:`GroupRelative`.
    Preference objectives (``objective.pairs``): no statistics; each pair's preference map on the
    latent grid, in both of its rows (N, h, w): from the reward maps of its two samples
    (``preference_scale``), or ``preferences`` (N, H, W) as the label stage wrote them.
    """
    if not isinstance(algorithm, str) and algorithm.pairs:
        return algorithm.advantages(maps, latent_hw, preference_scale, preferences)
    per_sample = objective_class(algorithm)[1] if isinstance(algorithm, str) else algorithm.per_sample
    if per_sample:
        return tracker.update(prompts, maps.float().mean((1, 2)))
    return tracker.update(prompts, to_latent_grid(maps, latent_hw))


def train_on_trajectories(
    state: TrainState, traj: Trajectories, advantages: torch.Tensor, cfg: Config, epoch: int, *, progress=False,
    guard: StepGuard | None = None, objective: Objective | None = None, health: RatioHealth | None = None,
) -> dict:
    """Inner epochs of updates on stored trajectories (the objective's loss, PPO-clipped PG or NFT).

    Args:
        traj: this process's samples (N of them): its contiguous block of the epoch's
            samples (:func:`pxpo.training.distributed.shard`); with one process, all of them.
        advantages: (N, h, w) PXPO maps or (N,) DDPO scalars.
        guard: the run's :class:`pxpo.training.guardrails.StepGuard` (default: a new one
            from ``cfg.train``). A step with a non-finite loss or gradient is
            skipped; too many, or a gradient-norm spike, raise
            :class:`pxpo.training.guardrails.TrainingStopped`.
        objective: the run's objective (default: ``train.algorithm``'s, :func:`make_objective`).
        health: the run's ratio health check (default: a new one; it warns once per run).
            The KL reference is ``state.reference`` (None: ``train.kl_coef`` 0).

    Each optimizer step takes ``gradient_accumulation_steps`` global micro-batches
    of ``train.batch_size`` samples, each sample at ``timestep_fraction`` of the
    policy's trained transitions (permuted per sample); its P pairs are computed
    in ``train.compute_batch`` chunks and its gradient is the mean over them
    (:class:`pxpo.training.step.StepRunner`).

    Returns:
        mean diagnostics over finite values: loss, the objective's own (PG: approx_kl, clipfrac,
        ratio, clipfrac_element, clipfrac_mean, log_ratio_rms_element, log_ratio_rms_mean
        (core/losses.py) and ratio_dev_max; NFT: nft_positive, nft_negative, nft_old_deviation),
        kl_ref with a reference, grad_norm; optimizer_steps (applied), skipped_steps.
    """
    from tqdm.auto import tqdm

    acc, t = state.accelerator, cfg.train
    policy = state.policy
    if not torch.equal(policy.timesteps, traj.timesteps.long().cpu()):
        raise PxpoInputError(
            "trajectories: timesteps", f"{traj.timesteps.tolist()} differ from the config's sampler ({policy.timesteps.tolist()})", "train with the sample section the trajectories were sampled with"
        )
    objective = make_objective(t, cfg.sample) if objective is None else objective
    trained = objective.steps(policy)  # PG: the policy's trained transitions; NFT: every level of the schedule
    n_train_t = max(1, int(len(trained) * t.timestep_fraction))
    # Global order (pxpo.training.distributed): the same generator on every process; this process trains on its
    # train.batch_size / N samples of each global micro-batch, and DDP averages the N gradients.
    # A preference objective's units are aligned pairs (samples 2p, 2p + 1): train.batch_size / 2 pairs per micro-batch.
    unit = 2 if objective.pairs else 1
    world, rank, n_samples = acc.num_processes, acc.process_index, len(traj)
    if n_samples % unit or (t.batch_size // unit) % world:
        raise PxpoInputError("train.batch_size", f"{t.algorithm} trains on whole pairs: {n_samples} samples per process, {t.batch_size // unit} pairs per "
                             f"micro-batch over {world} processes", "use an even number of samples per process and train.batch_size / 2 divisible by the processes")
    n = n_samples // unit
    n_global, local_b, gas = n * world, t.batch_size // unit // world, t.gradient_accumulation_steps
    g = torch.Generator().manual_seed(cfg.seed * 7_919 + epoch * 104_729)
    guard = StepGuard.from_config(t) if guard is None else guard
    skipped_before = guard.skipped
    # ratio health (pxpo.training.guardrails.RatioHealth): checked on each epoch's first update
    health = RatioHealth.from_config(t, precision_of(acc, state.unet)) if health is None else health
    health.start_epoch()
    data, where = EpochData(traj, advantages, acc.device), f"training epoch {epoch}"
    runner = StepRunner(
        state, policy, objective, data, t, state.train_compute, guard, where,
        reference=state.reference, health=health, seed=cfg.seed * 7_919 + epoch, offset=rank * n_samples,
    )
    state.unet.train()
    bar = tqdm(total=t.inner_epochs * n * n_train_t, desc=f"train epoch {epoch}", disable=not progress, leave=False)
    for _ in range(t.inner_epochs):
        batches = micro_batches(n_global, t.batch_size // unit, g)
        time_perm = torch.stack([trained[torch.randperm(len(trained), generator=g)] for _ in range(n_global)])[shard(n_global, rank, world)]
        for w in range(0, len(batches), gas):  # one optimizer step: gas micro-batches x n_train_t timesteps
            s_idx, j_idx = [], []
            for global_idx in batches[w : w + gas]:
                idx = global_idx[rank * local_b : (rank + 1) * local_b] - rank * n
                for j in range(n_train_t):
                    s_idx.append(idx)
                    j_idx.append(time_perm[idx, j])
            runner.step(torch.cat(s_idx), torch.cat(j_idx), bar)
    bar.close()
    steps_per_epoch = t.inner_epochs * -(-len(batches) // gas)
    objective.end_epoch(runner.ctx, (epoch + 1) * steps_per_epoch)  # NFT: the soft update of its sampling policy
    out = runner.logs()
    out["skipped_steps"] = guard.skipped - skipped_before
    return out


def run(
    cfg: Config,
    pipe,
    state: TrainState,
    *,
    labeller,
    prompts: PromptSource,
    tracker: Tracker,
    progress: bool = True,
    resume: bool = True,
    stop_after_epochs: int | None = None,
    first_batch: tuple[Trajectories, torch.Tensor, dict] | None = None,
    init_state: Path | None = None,
    rounds: int | None = None,
) -> dict:
    """The online loop: ``cfg.train.epochs`` epochs of sample -> label -> train.

    Args:
        pipe, state: the pipeline to sample with and the optimisation state
            (:func:`pxpo.training.state.build_train_state`).
        labeller: images (N, 3, H, W), prompts -> (maps (N, H, W), info).
        prompts: the prompts each epoch draws from.
        tracker: receives params, per-epoch metrics and, every ``train.probe_every`` epochs,
            the epoch's mean reward map and the probe batch's base-vs-policy grid as images
            (:func:`log_epoch_images`; main process only).

    Writes into ``cfg.output_dir``: checkpoints/, lora/ (or model/),
    summary.json, reward_curve.png, samples_last_epoch.png. With ``resume`` it
    continues from the newest checkpoint. ``stop_after_epochs`` ends the
    process early (tests simulate a kill with it).

    Stage form (``pxpo train``): ``first_batch`` = (trajectories, reward maps, the labeller's info)
    sampled and labelled by the sample/label stages replaces the first epoch's
    sampling and labelling; ``init_state`` is a previous stage output to
    continue from (its ``state/`` and ``pxpo_round.json``); ``rounds`` epochs
    are run, and the final state is exported to ``<output_dir>/state`` so the
    next round can continue.

    Returns:
        the summary dict (also written to summary.json).
    """
    run_dir, acc = Path(cfg.output_dir), state.accelerator
    stat_tracker = make_stat_tracker(cfg.train)
    acc.register_for_checkpointing(stat_tracker)
    # the run's objective (train.algorithm) and ratio health check (warns once per run); the KL reference
    # (train.kl_coef > 0) is state.reference, taken when the state was built (= the base model)
    objective = make_objective(cfg.train, cfg.sample)
    if objective.stateful:  # NFT's soft-updated sampling policy is part of a checkpoint
        acc.register_for_checkpointing(objective)
    health = RatioHealth.from_config(cfg.train, precision_of(acc, state.unet))
    start_epoch = restore(acc, run_dir, resume=resume, init_state=init_state)
    if acc.is_main_process:
        tracker.truncate(start_epoch)
        tracker.log_params(cfg.to_dict())
    # guardrails (pxpo.training.guardrails): step checks for the whole run, drift on a fixed probe batch
    guard = StepGuard.from_config(cfg.train)
    probe = DriftProbe.build(cfg, pipe, state, prompts, run_dir, fresh=start_epoch == 0 and init_state is None, previous=init_state)

    latent_hw = latent_grid(acc.unwrap_model(state.unet).config)  # (h, w) of the network's latents
    world, rank = acc.num_processes, acc.process_index
    n_global = cfg.sample.batch_size * cfg.sample.num_batches  # samples per epoch, over all processes
    mine = shard(n_global, rank, world)
    total_epochs = cfg.train.epochs if rounds is None else start_epoch + rounds
    end_epoch = total_epochs if stop_after_epochs is None else min(total_epochs, start_epoch + stop_after_epochs)
    for epoch in range(start_epoch, end_epoch):
        staged = first_batch is not None and epoch == start_epoch
        if staged:
            # Stage form: this epoch's samples and maps come from the sample / label stages.
            traj, maps, info = first_batch  # info: the label stage's (reward_<key> of several components)
            # preference objectives: the label stage's preference maps, expanded to samples (N, H, W) (pxpo.stages.train)
            preferences = (info := dict(info)).pop("preferences", None)
            if len(traj) != n_global:
                raise PxpoInputError(
                    "trajectories", f"{len(traj)} samples, but the config's epoch has {n_global}", "sample with the same sample.batch_size and sample.num_batches"
                )
            epoch_prompts, local = list(traj.prompts), traj.select(mine) if world > 1 else traj
            t_sample = t_label = 0.0
        else:
            # ---------------- SAMPLING ----------------
            t0 = time.perf_counter()
            preferences = None  # preference objectives: from this epoch's reward maps (sample.pairs: 2i = A, 2i + 1 = B)
            # Sample i of the epoch has the prompt and noise of global index i whatever the number of
            # processes; this process rolls out its block, sample.batch_size / N per UNet batch.
            epoch_prompts = prompts.draw_groups(n_global, cfg.sample.prompt_group, sample_seed(cfg.seed, epoch, 0, 0))
            seeds = [sample_seed(cfg.seed, epoch, 0, i) for i in range(n_global)]
            pipe.unet = acc.unwrap_model(state.unet)
            with acc.autocast(), objective.sampling(state.params):  # NFT with a soft-updated old policy: its weights
                local = sample_trajectories(
                    pipe, cfg, epoch_prompts[mine], seeds[mine], batch_size=cfg.sample.batch_size // world,
                    policy=state.policy, compute=state.sample_compute, network=(state.compiled or {}).get("sample"),
                )
            t_sample = time.perf_counter() - t0

            # ---------------- LABELLING ----------------
            t0 = time.perf_counter()
            maps, info = label_images(labeller, local.images, local.prompts, where=f"reward labeller {cfg.reward.describe()!r}")
            t_label = time.perf_counter() - t0

        # ---------------- ADVANTAGES ----------------
        # Every rank holds the epoch's prompts; the maps are gathered once (staged: already all loaded),
        # and every rank runs the same stat tracker: identical advantages on every rank.
        def compute(tracker_, prompts_, maps_):
            return compute_advantages(tracker_, prompts_, maps_, latent_hw, objective, preference_scale=cfg.reward.preference_scale, preferences=preferences)

        all_maps, adv_all = global_advantages(acc, stat_tracker, compute, epoch_prompts, maps, gathered=staged)
        adv = adv_all[mine]

        # ---------------- TRAINING ----------------
        t0 = time.perf_counter()
        try:
            train_logs = mean_over_processes(acc, train_on_trajectories(state, local, adv, cfg, epoch, progress=progress, guard=guard, objective=objective, health=health))
        except TrainingStopped as err:
            raise rollback(state, run_dir, tracker, err, init_state) from err
        t_train = time.perf_counter() - t0

        # ---------------- LOGGING ----------------
        scalar = all_maps.mean((1, 2))
        metrics = {
            "reward_mean": scalar.mean().item(),
            "reward_std": scalar.std(unbiased=False).item(),
            "samples_seen": (epoch + 1) * n_global,
            **mean_over_processes(acc, component_means(info)),  # reward_<key> of each of several reward components
            **train_logs,
            "time_sample": t_sample,
            "time_label": t_label,
            "time_train": t_train,
        }
        probe_images = None
        if probe is not None and probe.due(epoch):  # every train.probe_every epochs: drift on the fixed probe batch
            probe_images, probe_latents = probe.sample(pipe, state, cfg)
            metrics.update(probe.drift(probe_images, probe_latents))
        if acc.is_main_process:
            tracker.log_metrics(metrics, step=epoch)
            if images_due(cfg.train, epoch):
                log_epoch_images(tracker, epoch, all_maps, probe, probe_images)
            if progress:
                print(epoch_line(epoch, metrics), flush=True)
        if rounds is None and ((epoch + 1) % cfg.train.save_every == 0 or epoch + 1 == cfg.train.epochs):
            save_checkpoint(state, run_dir, epoch, cfg.train.keep_checkpoints)

    return finish(cfg, state, tracker, run_dir, start_epoch=start_epoch, end_epoch=end_epoch, total_epochs=total_epochs,
                  rounds=rounds, last_images=local.images if end_epoch > start_epoch else None)


def make_stat_tracker(t):
    """The advantage statistics of ``cfg.train``: GRPO's groups, or per-prompt buffers."""
    if t.advantage_mode == "group":  # GRPO: within each epoch's groups of sample.group_size
        return GroupRelative(t.baseline, t.group_std)
    return PerPromptStatTracker(t.buffer_size, t.min_count, t.baseline, max_bytes=int(t.tracker_max_mb * 2**20))


def restore(acc, run_dir: Path, *, resume: bool, init_state: Path | None) -> int:
    """Loads the state a run continues from; returns its first epoch.

    Stage form: ``init_state`` (a previous ``pxpo train`` output: ``state/``, ``pxpo_round.json``).
    Online: the newest checkpoint under ``run_dir`` when ``resume``; a fresh run drops a stale summary.json.
    """
    ck = latest_checkpoint(run_dir) if resume else None
    if init_state is not None:
        acc.load_state(str(Path(init_state) / "state"))
        return json.loads((Path(init_state) / "pxpo_round.json").read_text())["completed_rounds"]
    if ck is not None:
        acc.load_state(str(ck))
        start = json.loads((ck / "pxpo_epoch.json").read_text())["completed_epochs"]
        acc.print(f"resumed from {ck} at epoch {start}")
        return start
    if acc.is_main_process and run_dir.exists():
        (run_dir / "summary.json").unlink(missing_ok=True)
    return 0


def images_due(t, epoch: int) -> bool:
    """Images are logged at the drift probe's cadence: after epochs e with (e + 1) % ``train.probe_every`` == 0."""
    return t.probe_every > 0 and (epoch + 1) % t.probe_every == 0


def log_epoch_images(tracker: Tracker, epoch: int, maps: torch.Tensor, probe: DriftProbe | None, probe_images: torch.Tensor | None) -> None:
    """The epoch's images at step ``epoch``: ``reward_map_mean`` (the mean of the epoch's reward maps (N, H, W),
    a heatmap) and, with the drift probe, ``probe_samples`` (base vs policy on the probe batch, :meth:`DriftProbe.grid`)."""
    from ..plots import heatmap_image

    tracker.log_image(heatmap_image(maps.float().mean(0).cpu(), f"mean reward map, epoch {epoch}"), "reward_map_mean", step=epoch)
    if probe is not None and probe_images is not None:
        tracker.log_image(probe.grid(probe_images, epoch), "probe_samples", step=epoch)


def epoch_line(epoch: int, m: dict) -> str:
    """The progress line of an epoch: the reward, then the objective's own signal (PG: approx_kl and clipfrac)."""
    nan = float("nan")
    line = f"epoch {epoch:3d}  reward {m['reward_mean']:.4f} +- {m['reward_std']:.4f}  "
    if "approx_kl" in m:
        line += (f"kl {m['approx_kl']:.2e}  clipfrac {m.get('clipfrac', nan):.3f} "
                 f"(element {m.get('clipfrac_element', nan):.3f}, mean {m.get('clipfrac_mean', nan):.3f})  ")
    if "nft_old_deviation" in m:
        line += f"old deviation {m['nft_old_deviation']:.2e}  "
    if "kl_ref" in m:
        line += f"kl_ref {m['kl_ref']:.2e}  "
    return line + f"sample {m['time_sample']:.1f}s  train {m['time_train']:.1f}s"


def finish(cfg: Config, state: TrainState, tracker: Tracker, run_dir: Path, *, start_epoch: int, end_epoch: int, total_epochs: int,
           rounds: int | None, last_images: torch.Tensor | None) -> dict:
    """After the last epoch: the last samples' grid; stage form: the state for the next round; a run that
    completed: the policy, summary.json and the reward curve. Returns the summary."""
    acc = state.accelerator
    summary = {"completed_epochs": end_epoch, "output_dir": str(run_dir)}
    if acc.is_main_process and last_images is not None and last_images.numel():
        from ..plots import save_grid

        save_grid(last_images[:32], run_dir / "samples_last_epoch.png", nrow=8)
    if rounds is not None:
        acc.save_state(str(run_dir / "state"))
        if acc.is_main_process:
            (run_dir / "pxpo_round.json").write_text(json.dumps({"completed_rounds": end_epoch}))
    if acc.is_main_process and end_epoch == total_epochs:
        save_policy(state, cfg, run_dir / ("lora" if cfg.train.use_lora else "model"))
        history = tracker.history()
        if history:
            from ..plots import reward_curve

            summary.update(
                reward_first=history[0]["reward_mean"],
                reward_last=history[-1]["reward_mean"],
                reward_curve=[h["reward_mean"] for h in history],
            )
            reward_curve({cfg.train.algorithm: history}, run_dir / "reward_curve.png")
        from ..storage import write_json

        write_json(run_dir / "summary.json", summary)
    acc.wait_for_everyone()
    return summary
