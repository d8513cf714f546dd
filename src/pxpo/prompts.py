"""Prompt sources: the embedded digits prompts or a user's .txt / .jsonl file."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from .errors import PxpoInputError
from .storage import jsonl_objects

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def digit_prompt(d: int) -> str:
    """The canonical prompt for digit ``d`` (what the model is pretrained on)."""
    return f"a handwritten digit {d}"


def load_prompts(source: str, split: str = "train") -> list[str]:
    """The prompt list of ``prompts.source`` (see :func:`load_weighted_prompts`)."""
    return load_weighted_prompts(source, split)[0]


def load_weighted_prompts(source: str, split: str = "train") -> tuple[list[str], list[float]]:
    """Prompts and sampling weights of ``prompts.source``.

    ``"digits"`` gives the ten embedded prompts. A directory is a prepared
    dataset (``pxpo prepare``): its ``<split>.jsonl``. A ``.txt`` file has one
    prompt per line (blank lines and ``#`` comments skipped); a ``.jsonl`` file
    has one object per line with a ``"prompt"`` string and optional ``"weight"``.
    """
    if source == "digits":
        return [digit_prompt(d) for d in range(10)], [1.0] * 10
    p = Path(source)
    if p.is_dir():
        if not (p / f"{split}.jsonl").is_file():
            raise PxpoInputError(f"prompts.source={source}", f"no {split}.jsonl in this directory", "pass a directory written by `pxpo prepare`")
        p = p / f"{split}.jsonl"
    if not p.is_file():
        raise PxpoInputError(
            f"prompts.source={source}", "file not found", "pass a .txt or .jsonl prompt file, or `digits`"
        )
    text = p.read_text(encoding="utf-8", errors="replace")
    prompts: list[str] = []
    weights: list[float] = []
    if p.suffix == ".jsonl":
        for n, obj in jsonl_objects(text, p, "write one JSON object per line"):
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
                raise PxpoInputError(
                    f"{p}:{n}", "missing a non-empty string field 'prompt'", 'write lines like {"prompt": "a cat"}'
                )
            w = obj.get("weight", 1.0)
            if not isinstance(w, (int, float)) or isinstance(w, bool) or not w > 0:
                raise PxpoInputError(f"{p}:{n}", f"weight {w!r} is not a positive number", "give weights > 0 or leave them out")
            prompts.append(obj["prompt"].strip())
            weights.append(float(w))
    else:
        prompts = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        weights = [1.0] * len(prompts)
    if not prompts:
        raise PxpoInputError(str(p), "contains no prompts", "add at least one prompt (one per line, or JSONL objects)")
    return prompts, weights


def draw_prompts(prompts: list[str], n: int, seed: int, weights: list[float] | None = None) -> list[str]:
    """``n`` prompts drawn with replacement (by ``weights`` if given), reproducibly from ``seed``."""
    rng = random.Random(seed)
    if weights is None or len(set(weights)) <= 1:
        return [rng.choice(prompts) for _ in range(n)]
    return rng.choices(prompts, weights=weights, k=n)


@dataclass(frozen=True)
class PromptSource:
    """The prompts an epoch draws from (with sampling weights); handed to the training loop."""

    prompts: list[str]
    weights: list[float]

    @classmethod
    def load(cls, source: str, split: str = "train") -> "PromptSource":
        """``prompts.source``: "digits", a prepared dataset directory, or a .txt / .jsonl file."""
        return cls(*load_weighted_prompts(source, split))

    def draw(self, n: int, seed: int) -> list[str]:
        """``n`` prompts drawn with replacement by weight (see :func:`draw_prompts`)."""
        return draw_prompts(self.prompts, n, seed, self.weights)

    def draw_groups(self, n: int, group_size: int, seed: int) -> list[str]:
        """``n`` prompts as n / group_size draws, each repeated group_size times in a row (GRPO's groups,
        ``sample.group_size``); group_size 1 is :meth:`draw`."""
        return [p for p in self.draw(n // group_size, seed) for _ in range(group_size)]
