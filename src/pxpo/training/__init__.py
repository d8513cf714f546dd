"""Training: the loop (loop.py) -> one optimizer step (step.py) -> the objective (objectives.py) -> the policy (pxpo.core.policy).

Besides them: the optimisation state (state.py), the KL reference (reference.py), health checks
(guardrails.py), rollouts and labelling (rollout.py), compute batches (compute_batch.py) and data
parallelism (distributed.py).
"""
