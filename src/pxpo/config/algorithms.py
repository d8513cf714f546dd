"""The registry of ``train.algorithm``: what each algorithm is, read by the config checks and the training objectives.

One row per algorithm; nothing else in pxpo compares algorithm names.
:func:`pxpo.training.objectives.make_objective` builds the objective a row names.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Algorithm:
    """``objective``: the objective class's kind (``policy_gradient`` or ``nft``, pxpo.training.objectives);
    ``per_sample``: advantages from each map's mean (True) or per latent position (False);
    ``forward_process``: trains on the forward process of a flow model (no sampler log-probs)."""

    objective: str
    per_sample: bool
    forward_process: bool


ALGORITHMS: dict[str, Algorithm] = {
    "pxpo": Algorithm("policy_gradient", per_sample=False, forward_process=False),
    "ddpo": Algorithm("policy_gradient", per_sample=True, forward_process=False),
    "nft": Algorithm("nft", per_sample=False, forward_process=True),
    "nft_scalar": Algorithm("nft", per_sample=True, forward_process=True),
}


def algorithm(name: str) -> Algorithm:
    """The row of ``train.algorithm: <name>``."""
    if name not in ALGORITHMS:
        from ..errors import PxpoInputError

        raise PxpoInputError("train.algorithm", f"unknown algorithm {name!r}", f"use one of {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]
