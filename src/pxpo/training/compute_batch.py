"""Compute batches: how many items go through the network in one call, apart from the algorithm's batches.

Sampling rolls out ``sample.batch_size`` samples per algorithm batch and
training takes one optimizer step per ``train.batch_size x
gradient_accumulation_steps`` samples x trained timesteps; neither number is
the best size for the GPU. ``sample.compute_batch`` / ``train.compute_batch``
set the size of one network call instead (the maths is unchanged: samples are
independent, and a step's gradient is a sum over its (sample, timestep)
pairs, whatever the grouping).

``auto``: on CUDA, the first call runs at the algorithm's size, its peak
memory per item is measured, and later calls take the largest size that fits
the free memory (:func:`pick_compute_batch`, :func:`available_bytes`). On CPU
it is the algorithm's size. Whatever the setting, an out-of-memory error
halves the size, warns, and redoes the work (:meth:`ComputeBatch.run`)
instead of crashing.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

MARGIN = 0.85  # fraction of the available memory an auto-sized call may use


def is_oom(err: BaseException) -> bool:
    """A CUDA (or other accelerator) out-of-memory error."""
    oom = getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(err, oom) or (isinstance(err, RuntimeError) and "out of memory" in str(err))


def available_bytes(device) -> int | None:
    """Bytes a new allocation can get on a CUDA ``device``: driver-free plus cached-but-unused; None elsewhere."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def pick_compute_batch(total: int, per_item_bytes: float, available: float, margin: float = MARGIN) -> int:
    """The largest batch in [1, total] whose measured per-item memory fits ``margin * available``."""
    if per_item_bytes <= 0:
        return total
    return max(1, min(total, int(margin * available // per_item_bytes)))


class ComputeBatch:
    """The compute batch of one kind of work, adapted over a run.

    Args:
        setting: an int (fixed size) or ``"auto"``.
        device: where the work runs (``auto`` measures only on CUDA).
        what: the config field, for the warning (``"train.compute_batch"``).
    """

    def __init__(self, setting: int | str, device, what: str):
        self.setting, self.device, self.what = setting, torch.device(device), what
        self.size: int | None = setting if isinstance(setting, int) else None
        self.measured = False

    def _measure(self) -> bool:
        return self.setting == "auto" and not self.measured and self.device.type == "cuda"

    def run(self, total: int, start: int, fn: Callable[[slice], object], restart: Callable[[], None] | None = None) -> list:
        """Call ``fn(chunk)`` over ``range(total)`` in consecutive slices; return the results in order.

        ``start``: the algorithm's own size (the first size of ``auto``, and
        its size on CPU). On an out-of-memory error the size is halved (a
        warning says so) and the work is redone: from the failed chunk, or,
        with ``restart`` (e.g. zeroing accumulated gradients), from the first
        chunk after calling it. Size 1 running out of memory re-raises.
        """
        while True:
            size = self.size or max(1, min(start, total))
            results, i = [], 0
            try:
                while i < total:
                    chunk = slice(i, min(total, i + size))
                    if self._measure():
                        results.append(self._measured_call(fn, chunk, total))
                        size = self.size
                    else:
                        results.append(fn(chunk))
                    i = chunk.stop
                return results
            except Exception as err:  # noqa: BLE001 -- only out-of-memory is handled
                if not is_oom(err) or size <= 1:
                    raise
                self.size = max(1, size // 2)
                self.measured = True  # a measured size that failed is not measured again
                warnings.warn(f"{self.what}: out of memory at {size} per call; retrying at {self.size}", RuntimeWarning, stacklevel=2)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if restart is None:
                    return results + self.run(total - i, self.size, lambda c: fn(slice(c.start + i, c.stop + i)))
                restart()

    def _measured_call(self, fn, chunk: slice, total: int):
        """Run one chunk measuring its peak memory per item; size the next calls from it."""
        dev = self.device
        torch.cuda.synchronize(dev)
        before = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        out = fn(chunk)
        torch.cuda.synchronize(dev)
        per_item = (torch.cuda.max_memory_allocated(dev) - before) / (chunk.stop - chunk.start)
        self.size = pick_compute_batch(total, per_item, available_bytes(dev))
        self.measured = True
        return out
