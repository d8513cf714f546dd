"""Prompt sources: the embedded digits prompts or a user's .txt / .jsonl file."""

from __future__ import annotations

import json
import random
from pathlib import Path

from .base_model import digit_prompt
from .errors import PxpoInputError


def load_prompts(source: str) -> list[str]:
    """The prompt list of ``prompts.source``.

    ``"digits"`` gives the ten embedded prompts. A ``.txt`` file has one prompt
    per line (blank lines and ``#`` comments skipped); a ``.jsonl`` file has one
    object per line with a ``"prompt"`` string.
    """
    if source == "digits":
        return [digit_prompt(d) for d in range(10)]
    p = Path(source)
    if not p.is_file():
        raise PxpoInputError(
            f"prompts.source={source}", "file not found", "pass a .txt or .jsonl prompt file, or `digits`"
        )
    text = p.read_text(encoding="utf-8", errors="replace")
    prompts: list[str] = []
    if p.suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise PxpoInputError(f"{p}:{n}", f"not valid JSON ({e.msg})", "write one JSON object per line") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
                raise PxpoInputError(
                    f"{p}:{n}", "missing a non-empty string field 'prompt'", 'write lines like {"prompt": "a cat"}'
                )
            prompts.append(obj["prompt"].strip())
    else:
        prompts = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise PxpoInputError(str(p), "contains no prompts", "add at least one prompt (one per line, or JSONL objects)")
    return prompts


def draw_prompts(prompts: list[str], n: int, seed: int) -> list[str]:
    """``n`` prompts drawn uniformly with replacement, reproducibly from ``seed``."""
    rng = random.Random(seed)
    return [rng.choice(prompts) for _ in range(n)]
