"""``pxpo train``: epochs of training that start on labelled trajectories from the sample/label stages."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

from ..config import Config
from ..errors import PxpoInputError

HISTORY_COLUMNS = ["epoch", "samples_seen", "reward_mean", "reward_std", "approx_kl", "clipfrac", "clipfrac_element", "clipfrac_mean", "loss", "grad_norm"]


def check_sampling_matches(cfg: Config, meta: dict, where: Path) -> None:
    """Refuse to train on trajectories sampled with other settings than ``cfg``'s.

    The re-scored log-probs are only the behaviour policy's when the sampler,
    steps, eta, guidance and negative prompt are the ones the samples were drawn with.
    """
    for key in ("sampler", "num_steps", "eta", "guidance_scale"):
        if meta.get(key, "ddim") != getattr(cfg.sample, key):
            raise PxpoInputError(
                f"sample.{key}",
                f"config says {getattr(cfg.sample, key)} but {where} was sampled with {meta[key]}",
                f"train with the sampling settings: pass sample.{key}={meta[key]}",
            )
    if meta.get("negative_prompt", "") != cfg.prompts.negative_prompt:
        raise PxpoInputError("prompts.negative_prompt", f"differs from the one {where} was sampled with", "use the sampling-time negative prompt")


def train(cfg: Config, trajectories: Path, out: Path, *, state: Path | None = None, rounds: int | None = None,
          history: Path | None = None, progress: bool = False) -> dict:
    """Run ``rounds`` epochs (default ``train.epochs``): the first on ``trajectories`` and their
    reward maps, the rest sampled online; continue from ``state`` (a previous output) if given.

    Writes ``out`` whole or not at all: lora/ (or model/), state/,
    pxpo_round.json, metrics.jsonl, images/ (every ``train.probe_every`` epochs; with ``state``'s
    earlier ones, as metrics.jsonl holds the earlier rounds' metrics), summary.json. ``history`` also gets the
    per-epoch metrics as CSV (DVC plots). Returns the summary plus
    ``history`` (the per-epoch metrics) and ``rounds``.
    """
    from ..training.distributed import check_launch, shared_atomic_dir
    from ..storage import atomic_file
    from ..tracking import JsonlTracker
    from ..training.loop import run
    from ..trajectories import load_trajectories
    from .collaborators import loop_collaborators

    check_launch()
    d = Path(trajectories)
    traj = load_trajectories(d, with_images=False)
    maps, info = labelled_maps(cfg, d, traj)
    check_sampling_matches(cfg, traj.meta, d)
    if "imported" in traj.meta and cfg.train.algorithm != "diffusion_dpo":  # `pxpo pairs import`: clean latents only, no sampler log-probs
        raise PxpoInputError(str(d / "meta.json"), f"imported image pairs (no sampled trajectories) cannot train train.algorithm={cfg.train.algorithm}",
                             "train them with train.algorithm=diffusion_dpo")
    if state and not (Path(state) / "pxpo_round.json").is_file():
        raise PxpoInputError(str(state), "not a trainer state directory (no pxpo_round.json)", "pass the --out of a previous `pxpo train`")
    rounds = rounds if rounds is not None else cfg.train.epochs
    collaborators = loop_collaborators(cfg)
    acc = collaborators["state"].accelerator
    # Under torchrun every process writes into one temporary directory (checkpoint state: each rank's
    # RNG file; metrics, policy: the main process only), renamed into place by the main process.
    with shared_atomic_dir(Path(out), acc) as tmp:
        cfg.output_dir = str(tmp)
        if state and (Path(state) / "images").is_dir() and acc.is_main_process:  # the earlier rounds' images, as their metrics
            shutil.copytree(Path(state) / "images", tmp / "images", dirs_exist_ok=True)
        summary = run(
            cfg,
            tracker=JsonlTracker(tmp),
            **collaborators,
            progress=progress,
            resume=False,
            first_batch=(traj, maps, info),
            init_state=Path(state) if state else None,
            rounds=rounds,
        )
        earlier = earlier_rounds(Path(state) if state else None)
        if earlier and acc.is_main_process:  # the output's metrics.jsonl is the whole run's, as `pxpo run`'s is
            f = tmp / "metrics.jsonl"
            f.write_text("".join(json.dumps(h) + "\n" for h in earlier) + f.read_text())
    hist = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines() if x][len(earlier):]  # this round
    if history and acc.is_main_process:
        with atomic_file(Path(history)) as f:
            w = csv.DictWriter(f, fieldnames=HISTORY_COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(earlier + hist)
    return {**summary, "history": hist, "rounds": rounds}


def labelled_maps(cfg: Config, d: Path, traj):
    """The label stage's output for the first epoch: (maps (N, H, W), info).

    Reward maps (``reward_maps.safetensors``) for the reward objectives. A preference algorithm
    (``train.algorithm`` d3po / diffusion_dpo) reads ``preference_maps.safetensors`` (from ``pxpo label``
    on aligned pairs or a Label Studio pairwise pull): its maps, expanded to both samples of each pair
    (unlabelled pairs: zeros, no preference), go to the loop as ``info["preferences"]``; ``maps`` are the
    reward maps when the directory has them (logged as the reward), else those expanded preference maps.
    """
    from ..config.algorithms import algorithm
    from ..core.preference import expand_to_samples, pairs_are_aligned
    from ..trajectories import MAPS, PREFERENCES, load_preference_maps, load_reward_maps

    n, hw = len(traj), tuple(traj.meta["image_shape"][1:])
    if not algorithm(cfg.train.algorithm).pairs:
        return load_reward_maps(d, n, hw)
    if "pairs" not in traj.meta:
        raise PxpoInputError(str(d / "meta.json"), f"not sampled in aligned pairs, which train.algorithm={cfg.train.algorithm} trains on",
                             "sample with sample.pairs=true, then label the pairs")
    pm, pairs, pinfo = load_preference_maps(d, hw)
    if not pairs_are_aligned(pairs, n):
        raise PxpoInputError(str(d / PREFERENCES), f"pairs {pairs[:3].tolist()}... are not aligned pairs [2p, 2p + 1] of the {n} samples",
                             "label the pairs of this directory (`pxpo label`, or `pxpo label-studio pull --pairs`)")
    prefs = expand_to_samples(pm, pairs, n)
    maps, info = load_reward_maps(d, n, hw) if (d / MAPS).is_file() else (prefs, {})
    return maps, {**info, "preferences": prefs, "preference_source": pinfo.get("source", "people")}


def earlier_rounds(state: Path | None) -> list[dict]:
    """The per-epoch metrics of the rounds before this one: ``state``'s (the previous output's) metrics.jsonl."""
    f = state / "metrics.jsonl" if state else None
    if f is None or not f.is_file():
        return []
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
