"""``pxpo prepare``: raw prompts -> a versioned, validated prompt dataset (train / held-out splits)."""

from __future__ import annotations

from pathlib import Path

from ..config import Config
from . import report_path


def prepare(cfg: Config, out: Path, *, input: str | Path | None = None, report: str | Path | None = None, drop_empty: bool = False) -> dict:
    """Deduplicate, split and validate (Great Expectations) the prompts; write the dataset at ``out``.

    Nothing is written when validation fails (the report is, beside ``out``).
    Returns dataset.json's content (version, counts, duplicates removed).
    """
    from ..prepare import assign_splits, deduplicate, read_prompt_table, write_dataset
    from ..validation import check, validate_prompts

    src = Path(input or cfg.prepare.input)
    df = read_prompt_table(src)
    df, removed = deduplicate(df.dropna(subset=["prompt"]) if drop_empty else df)
    p = cfg.prepare
    df = assign_splits(df, p)
    result = validate_prompts(
        df, min_length=p.min_length, max_length=p.max_length, min_heldout=p.min_heldout, max_heldout_fraction=p.max_heldout_fraction
    )
    check(result, report_path(report, Path(out)))
    return write_dataset(df, Path(out), source=src, removed=removed)
