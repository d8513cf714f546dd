"""``pxpo evaluate``: held-out prompts, policy vs base with the same seeds; validated maps; flat metrics."""

from __future__ import annotations

from pathlib import Path

from ..config import Config


def evaluate(cfg: Config, out: Path, *, policy: str | Path | None = None, prompts: str | None = None,
             metrics: Path | None = None, progress: bool = False) -> dict:
    """Evaluate ``policy`` (None: the base only) on the held-out prompts into ``out``.

    ``prompts`` overrides ``prompts.source`` (a prepared dataset's held-out
    split or a prompt file). The policy's reward maps must pass the Great
    Expectations suite (report at ``out/validation.json``). ``metrics`` also
    gets the numeric metrics as flat JSON (DVC metrics). Returns the metrics.
    """
    from safetensors.torch import load_file

    from ..evaluate import evaluate as run_evaluation
    from ..storage import write_json
    from ..validation import check, validate_reward_maps

    if prompts:
        cfg.prompts.source = prompts
    e = cfg.evaluate
    result = run_evaluation(cfg, str(policy) if policy else None, Path(out), samples_per_prompt=e.samples_per_prompt, seed=e.seed, progress=progress)
    maps = load_file(str(Path(out) / "reward_maps.safetensors"))["maps"]
    report = validate_reward_maps(maps, num_samples=result["num_samples"], height=maps.shape[1], width=maps.shape[2])
    report.save(Path(out) / "validation.json")
    check(report, Path(out) / "validation.json")
    if metrics:
        write_json(Path(metrics), {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return result
