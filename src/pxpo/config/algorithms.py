"""The registry of ``train.algorithm``: what each algorithm is, read by the config checks and the training objectives.

One row per algorithm; nothing else in pxpo compares algorithm names.
:func:`pxpo.training.objectives.make_objective` builds the objective a row names.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Algorithm:
    """``objective``: the objective class's kind (``policy_gradient``, ``nft``, ``d3po`` or ``diffusion_dpo``,
    pxpo.training.objectives);
    ``per_sample``: advantages from each map's mean (True) or per latent position (False);
    ``forward_process``: trains on the forward process (noised clean samples), not on the sampler's log-probs;
    ``samplers``: the ``sample.sampler`` values it trains (empty: any);
    ``pairs``: trains on aligned pairs (``sample.pairs``) with preference maps (issue 24), against a reference."""

    objective: str
    per_sample: bool
    forward_process: bool
    samplers: tuple[str, ...] = ()
    pairs: bool = False


ALGORITHMS: dict[str, Algorithm] = {
    "pxpo": Algorithm("policy_gradient", per_sample=False, forward_process=False),
    "ddpo": Algorithm("policy_gradient", per_sample=True, forward_process=False),
    "nft": Algorithm("nft", per_sample=False, forward_process=True, samplers=("flow_sde",)),
    "nft_scalar": Algorithm("nft", per_sample=True, forward_process=True, samplers=("flow_sde",)),
    # region-level preferences (issue 24; train.preference_map: region | whole)
    "d3po": Algorithm("d3po", per_sample=False, forward_process=False, pairs=True),
    "diffusion_dpo": Algorithm("diffusion_dpo", per_sample=False, forward_process=True, samplers=("ddim", "flow_sde"), pairs=True),
}


def algorithm(name: str) -> Algorithm:
    """The row of ``train.algorithm: <name>``."""
    if name not in ALGORITHMS:
        from ..errors import PxpoInputError

        raise PxpoInputError("train.algorithm", f"unknown algorithm {name!r}", f"use one of {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]
