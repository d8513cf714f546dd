"""The registry of samplers: ``sample.sampler`` -> its :class:`pxpo.core.policy.Policy` class.

Each class has ``from_config(sample_cfg, scheduler)`` and ``scheduler_class`` (the
diffusers scheduler class name the pipeline's scheduler is converted to when
loading, same config; None keeps the pipeline's own). A new sampler is one
module with one class, added here.
"""

from __future__ import annotations

from .ddim import DDIMPolicy
from .flow import FlowSDEPolicy
from .lcm import LCMPolicy
from .policy import Policy

POLICIES: dict[str, type] = {"ddim": DDIMPolicy, "lcm": LCMPolicy, "flow_sde": FlowSDEPolicy}


def policy_class(name: str) -> type:
    """The class registered for ``sample.sampler: <name>``."""
    if name not in POLICIES:
        from ..errors import PxpoInputError

        raise PxpoInputError("sample.sampler", f"unknown sampler {name!r}", f"use one of {', '.join(sorted(POLICIES))}")
    return POLICIES[name]


def make_policy(sample_cfg, scheduler) -> Policy:
    """The policy for ``sample_cfg.sampler`` (a :class:`pxpo.config.SampleConfig` or anything with its fields).

    Calls ``scheduler.set_timesteps`` once (the policy's timesteps are fixed from then on).
    """
    return policy_class(sample_cfg.sampler).from_config(sample_cfg, scheduler)
