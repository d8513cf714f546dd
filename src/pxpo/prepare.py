"""The prompt dataset stage: read, normalise, deduplicate, split, validate, write.

Input: a CSV (columns ``prompt``, optional ``weight``, optional ``split``), a
JSONL file (objects with the same keys) or a TXT file (one prompt per line).
Output directory (a versioned dataset)::

    train.jsonl      {"prompt": str, "weight": float} per line
    heldout.jsonl    same, the held-out prompts used by `pxpo evaluate`
    dataset.json     version (sha256 of the content), counts, source, duplicates removed

Prompts are stripped and inner whitespace collapsed; duplicates are found on
the case-folded form and the first occurrence is kept. Rows without a
``split`` are assigned by a stable hash of the prompt, so adding a prompt never
moves another one between splits.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from .config import PrepareConfig
from .errors import PxpoInputError


def normalise(prompt: str) -> str:
    return re.sub(r"\s+", " ", str(prompt)).strip()


def _hash_unit(text: str) -> float:
    return int(hashlib.sha256(text.casefold().encode()).hexdigest()[:12], 16) / 16**12


def read_prompt_table(path: Path):
    """Read the raw prompt file into a DataFrame with columns prompt, weight, split (None if absent)."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise PxpoInputError(str(path), "prompt file not found", "pass an existing .csv, .jsonl or .txt file with --input")
    try:
        if path.suffix == ".csv":
            df = pd.read_csv(path, dtype={"prompt": str, "split": str}, keep_default_na=False, na_values={"weight": [""]})
        elif path.suffix == ".jsonl":
            df = pd.read_json(path, lines=True, dtype=False)
        elif path.suffix == ".txt":
            lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
            df = pd.DataFrame({"prompt": lines})
        else:
            raise PxpoInputError(str(path), f"unsupported extension {path.suffix!r}", "use .csv, .jsonl or .txt")
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise PxpoInputError(str(path), f"could not be parsed ({e})", "fix the file's syntax (CSV with a header row, or one JSON object per line)") from None
    if "prompt" not in df.columns:
        raise PxpoInputError(f"{path}: column 'prompt'", f"missing (columns: {list(df.columns)})", "add a header row with a 'prompt' column")
    if "weight" not in df.columns:
        df["weight"] = 1.0
    if "split" not in df.columns:
        df["split"] = ""
    df = df[["prompt", "weight", "split"]].copy()
    df["prompt"] = df["prompt"].map(lambda p: normalise(p) if isinstance(p, str) else p)
    df["weight"] = pd.to_numeric(df["weight"], errors="coerce")
    df["split"] = df["split"].fillna("").astype(str).str.strip().str.lower()
    return df


def assign_splits(df, cfg: PrepareConfig):
    """Rows without a split go to held-out when their prompt's stable hash < heldout_fraction."""
    df = df.copy()
    empty = df["split"] == ""
    df.loc[empty, "split"] = [("heldout" if _hash_unit(p) < cfg.heldout_fraction else "train") for p in df.loc[empty, "prompt"]]
    return df


def deduplicate(df):
    """Drop case/whitespace duplicates (first kept). Returns (frame, removed rows as dicts)."""
    key = df["prompt"].map(lambda p: p.casefold() if isinstance(p, str) else p)
    dup = key.duplicated(keep="first")
    return df[~dup].reset_index(drop=True), df[dup].to_dict("records")


def write_dataset(df, out_dir: Path, *, source: Path, removed: list) -> dict:
    """Write train.jsonl / heldout.jsonl / dataset.json atomically; return dataset.json's content."""
    from .storage import atomic_dir

    parts = {}
    for split in ("train", "heldout"):
        rows = df[df["split"] == split]
        parts[split] = "".join(json.dumps({"prompt": p, "weight": float(w)}) + "\n" for p, w in zip(rows["prompt"], rows["weight"]))
    version = hashlib.sha256((parts["train"] + "\0" + parts["heldout"]).encode()).hexdigest()
    info = {
        "version": version,
        "source": str(source),
        "counts": {"train": int((df["split"] == "train").sum()), "heldout": int((df["split"] == "heldout").sum())},
        "duplicates_removed": len(removed),
        "removed": [r["prompt"] for r in removed][:100],
    }
    with atomic_dir(Path(out_dir)) as tmp:
        for split, text in parts.items():
            (tmp / f"{split}.jsonl").write_text(text)
        (tmp / "dataset.json").write_text(json.dumps(info, indent=2) + "\n")
    return info
