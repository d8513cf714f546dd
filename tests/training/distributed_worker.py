"""One torchrun worker of tests/training/test_distributed.py: several short runs in one launch.

Usage: ``python -m torch.distributed.run --standalone --nproc_per_node N tests/training/distributed_worker.py SPEC.json``.
SPEC is ``{"runs": [[override, ...], ...], "record": DIR}``. Each run goes
through ``pxpo.cli.main(["run", ...])`` exactly as ``pxpo run`` does; the
advantages every rank computes (and how many gathers each epoch made) are
written to ``DIR/<run>_rank<r>.pt`` so the test can compare ranks.
One launch for all runs: starting a process group costs seconds on 2 cores.
"""

import json
import sys
from pathlib import Path

import torch

import pxpo.training.loop
from pxpo.cli import main

_real = pxpo.training.loop.global_advantages
RECORDS: list = []


def recording(acc, tracker, compute, prompts, maps, *, gathered):
    calls = []
    real_gather = acc.gather

    def counting_gather(x):
        calls.append(1)
        return real_gather(x)

    acc.gather = counting_gather
    try:
        all_maps, adv = _real(acc, tracker, compute, prompts, maps, gathered=gathered)
    finally:
        acc.gather = real_gather
    RECORDS.append({"prompts": list(prompts), "maps": all_maps.clone(), "adv": adv.clone(), "gathers": len(calls)})
    return all_maps, adv


def run_all(spec: dict, rank: int) -> int:
    pxpo.training.loop.global_advantages = recording
    record = Path(spec["record"])
    for i, overrides in enumerate(spec["runs"]):
        RECORDS.clear()
        code = main(["run", "--quiet", "--params", "/dev/null", "--", *overrides])
        if code:
            return code
        torch.save(list(RECORDS), record / f"run{i}_rank{rank}.pt")
    return 0


if __name__ == "__main__":
    import os

    sys.exit(run_all(json.loads(Path(sys.argv[1]).read_text()), int(os.environ.get("RANK", 0))))
