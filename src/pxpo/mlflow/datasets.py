"""The prompt dataset as MLflow dataset inputs of a run (lineage: which prompts trained a model).

A prepared dataset (``pxpo prepare`` output: ``train.jsonl``, ``heldout.jsonl``,
``dataset.json``) gives two inputs: ``train`` (context ``training``) and
``heldout`` (context ``evaluation``), with the digest taken from the dataset's
content version. A prompt file or the embedded ``digits`` prompts give the
``train`` input only. Each input is a :class:`mlflow.data.pandas_dataset.PandasDataset`
with columns ``prompt`` (string) and ``weight`` (float), one row per prompt.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

DIGEST_CHARS = 12  # MLflow stores at most 36; it recommends ~8


def prompt_dataset(source: str, split: str = "train"):
    """``prompts.source`` (``digits``, a prepared directory or a prompt file) -> an MLflow PandasDataset.

    Raises:
        PxpoInputError: the source (or its ``<split>.jsonl``) does not exist or holds no prompts.
    """
    import mlflow.data
    import pandas as pd

    from ..prompts import load_weighted_prompts

    prompts, weights = load_weighted_prompts(source, split)
    df = pd.DataFrame({"prompt": prompts, "weight": weights})
    p = Path(source)
    digest = None
    if source == "digits":
        name, uri = f"pxpo-digits-{split}", None  # embedded: MLflow records the code location
    elif p.is_dir():
        name, uri = f"{p.resolve().name}-{split}", str((p / f"{split}.jsonl").resolve())
        try:
            version = json.loads((p / "dataset.json").read_text()).get("version")
        except (OSError, json.JSONDecodeError):
            version = None
        if isinstance(version, str) and version:
            digest = f"{version[:DIGEST_CHARS]}-{split}"[:36]
    else:
        name, uri = p.stem, str(p.resolve())
    with warnings.catch_warnings():  # a local path matches two equivalent source types
        warnings.filterwarnings("ignore", message=".*can be interpreted in multiple ways.*")
        return mlflow.data.from_pandas(df, source=uri, name=name, digest=digest)


def log_prompt_datasets(source: str) -> list[str]:
    """Log the prompt dataset of ``source`` as inputs of the active run (``mlflow.log_inputs``).

    ``train`` always (context ``training``); ``heldout`` (context ``evaluation``)
    when ``source`` is a prepared dataset directory that has one. Returns the
    splits logged. Without an active run MLflow starts one.
    """
    import mlflow

    splits = [("train", "training")]
    if Path(source).is_dir() and (Path(source) / "heldout.jsonl").is_file():
        splits.append(("heldout", "evaluation"))
    mlflow.log_inputs(datasets=[prompt_dataset(source, s) for s, _ in splits], contexts=[c for _, c in splits],
                      tags_list=[None] * len(splits))
    return [s for s, _ in splits]
