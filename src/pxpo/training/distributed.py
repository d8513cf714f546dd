"""Data-parallel training that equals one process: global sample indexing, sharding, launching.

The contract (docs/distributed.md): the SAME config gives the same run on any
number of processes N (up to float summation order, 1e-5 in the tests).

* Sample ``i`` of an epoch (``0 <= i < G``, ``G = sample.batch_size *
  sample.num_batches``) has the prompt and noise seed of index ``i`` whatever N
  is: every process draws the G prompts of the epoch and keeps its contiguous
  block ``[r G/N, (r+1) G/N)`` (:func:`shard`).
* ``sample.batch_size`` and ``train.batch_size`` are GLOBAL: each process runs
  ``batch_size / N`` samples per UNet batch / training micro-batch. A global
  micro-batch ``k`` is the same set of samples for every N
  (:func:`micro_batches`), each process computes the mean loss over its
  ``b / N`` of them, and DDP averages the N gradients: the mean over the
  ``b`` samples, the gradient one process computes. Accumulation steps,
  optimizer steps and clipping are then identical.
* Reward maps are gathered once per epoch; every rank holds every prompt and
  map and runs the same per-prompt stat tracker, so advantages are identical
  on every rank (:func:`global_advantages`).

Launching: ``pxpo run --processes N`` runs ``torchrun`` (``python -m
torch.distributed.run``) with N workers on this node (:func:`torchrun_argv`);
the workers' Accelerator uses gloo on CPU and NCCL on GPUs. A world size > 1
with no way to form a process group is refused (:func:`check_launch`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from ..errors import PxpoInputError

# Environment variables that carry a launcher's world size (torchrun / accelerate, MPI implementations).
_WORLD_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
LAUNCH_FIX = "launch with `pxpo run --processes N` (or `torchrun --nproc_per_node N -m pxpo.cli ...`), or unset the variable for one process"


def env_world_size(env: dict | None = None) -> int:
    """The world size a launcher announced in the environment (1 if none)."""
    env = os.environ if env is None else env
    for var in _WORLD_VARS:
        value = env.get(var)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                raise PxpoInputError(f"environment {var}={value!r}", "not an integer world size", LAUNCH_FIX) from None
    return 1


def check_launch(env: dict | None = None) -> int:
    """Refuse a world size > 1 that cannot form a process group; return the world size.

    torchrun (and accelerate launch) set WORLD_SIZE together with RANK,
    LOCAL_RANK, MASTER_ADDR and MASTER_PORT. Without them every process would
    train on its own and write into the same output directory, so this is an
    input error (exit 2), raised before anything is written.
    """
    env = os.environ if env is None else env
    world = env_world_size(env)
    if world > 1 and env.get("WORLD_SIZE") not in (None, ""):
        missing = [v for v in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if env.get(v) in (None, "")]
        if missing:
            raise PxpoInputError(
                f"environment WORLD_SIZE={env['WORLD_SIZE']}",
                f"a world size > 1 but no process group can be formed ({', '.join(missing)} unset)",
                LAUNCH_FIX,
            )
    elif world > 1:  # an MPI launcher: accelerate forms the group only with MASTER_ADDR / MASTER_PORT
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if env.get(v) in (None, "")]
        if missing:
            raise PxpoInputError(f"an MPI world of {world} processes", f"{', '.join(missing)} unset, so no process group can be formed", LAUNCH_FIX)
    return world


def check_accelerator(acc, env: dict | None = None) -> None:
    """After the Accelerator is built: its process group must span the launcher's world."""
    world = env_world_size(env)
    if world > 1 and acc.num_processes != world:
        raise PxpoInputError(
            f"world size {world}",
            f"the launcher started {world} processes but Accelerate formed a group of {acc.num_processes}",
            LAUNCH_FIX,
        )


def check_divisible(sample_batch: int, train_batch: int, processes: int) -> None:
    """N processes split every global UNet batch and training micro-batch evenly."""
    for field, value in (("sample.batch_size", sample_batch), ("train.batch_size", train_batch)):
        if value % processes:
            raise PxpoInputError(
                field,
                f"{value} (a global batch) does not split over {processes} processes",
                f"choose a multiple of {processes} for {field}, or run another number of processes",
            )


def shard(n_global: int, rank: int, world: int) -> slice:
    """This process's contiguous block of the ``n_global`` samples of an epoch."""
    per = n_global // world
    return slice(rank * per, (rank + 1) * per)


def micro_batches(n_global: int, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """The global micro-batches of one pass: n_global / batch index tensors of ``batch`` global sample indices.

    Column ``j`` holds a random order of the contiguous stratum
    ``[j G/b, (j+1) G/b)``, so the columns ``[r b/N, (r+1) b/N)`` hold exactly
    process r's block of :func:`shard` for every N dividing ``b``: each
    micro-batch is the same set of samples whatever N is, and each process
    finds its part of it among its own samples. Rows are the micro-batches
    in training order; each draws one sample per stratum.
    """
    if n_global % batch:  # only a direct single-process call can get here (the config and check_divisible forbid it)
        return torch.randperm(n_global, generator=generator).split(batch)
    rows = n_global // batch
    cols = [j * rows + torch.randperm(rows, generator=generator) for j in range(batch)]
    return torch.stack(cols, dim=1).unbind(0)


def global_advantages(acc, stat_tracker, compute, prompts: Sequence[str], maps: torch.Tensor, *, gathered: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """All ranks' reward maps (one gather) -> advantages of every sample, identical on every rank.

    Args:
        compute: ``(tracker, prompts, maps) -> advantages`` (the loop's compute_advantages).
        prompts: the G prompts of the epoch (every rank holds them all).
        maps: this rank's maps, or all G maps when ``gathered``.

    Returns:
        (all maps (G, H, W) on CPU, advantages of all G samples).
    """
    all_maps = maps if gathered or acc.num_processes == 1 else acc.gather(maps.to(acc.device).contiguous()).cpu()
    if all_maps.shape[0] != len(prompts):
        raise RuntimeError(f"{all_maps.shape[0]} gathered reward maps for {len(prompts)} prompts")
    return all_maps, compute(stat_tracker, list(prompts), all_maps)


def mean_over_processes(acc, values: dict) -> dict:
    """Average per-process scalar diagnostics over the processes (one all-reduce)."""
    if acc.num_processes == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=acc.device)
    t = acc.reduce(t, reduction="mean").cpu()
    return {k: float(v) for k, v in zip(keys, t)}


def torchrun_argv(processes: int | str, module_args: Sequence[str], *, env: dict | None = None) -> list[str]:
    """``python -m torch.distributed.run ... -m pxpo.cli <module_args>``: N workers per node.

    ``processes``: an int, or torchrun's ``gpu`` / ``auto`` (every GPU of the
    node). On one node the rendezvous is ``--standalone``; when the environment
    carries a multi-node rendezvous (``PET_NNODES``, ``PET_MASTER_ADDR``: what
    Kubeflow Trainer's torch runtime injects), torchrun reads it from there.
    """
    env = os.environ if env is None else env
    argv = [sys.executable, "-m", "torch.distributed.run"]
    if not (env.get("PET_NNODES") or env.get("PET_MASTER_ADDR") or env.get("PET_RDZV_ENDPOINT")):
        argv.append("--standalone")
    argv += ["--nproc_per_node", str(processes), "-m", "pxpo.cli", *module_args]
    return argv


def worker_env(env: dict | None = None) -> dict:
    """The environment of torchrun's workers: one compute thread each unless the user set OMP_NUM_THREADS."""
    env = dict(os.environ if env is None else env)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@contextlib.contextmanager
def shared_atomic_dir(target: Path, acc) -> Iterator[Path]:
    """:func:`pxpo.storage.atomic_dir` for all processes of a run: one temporary directory
    (deterministic name) that every rank writes into; the main process renames it into place."""
    from ..storage import atomic_dir, replace_dir

    if acc.num_processes == 1:
        with atomic_dir(target) as tmp:
            yield tmp
        return
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp-shared")
    if acc.is_main_process:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    acc.wait_for_everyone()
    yield tmp
    acc.wait_for_everyone()
    if acc.is_main_process:
        replace_dir(tmp, target)
    acc.wait_for_everyone()
