"""The stages: one plain function per ``pxpo <command>``.

Each stage function takes a :class:`pxpo.config.Config` and paths, does the
stage's work (loading, computing, validating, writing its artifact atomically)
and returns a small summary dict. ``pxpo.cli`` only parses arguments, calls one
of these and prints the summary; DVC stages and Kubeflow components run the
same command, so a test can call a stage function directly or through the CLI
and get the same result (DVC's example-get-started: a pure stage function and
a thin I/O main).

| command | module |
|---|---|
| ``pxpo base build`` / ``distill-lcm`` | :mod:`.base` |
| ``pxpo prepare`` | :mod:`.prepare` |
| ``pxpo sample`` | :mod:`.sample` |
| ``pxpo label`` | :mod:`.label` |
| ``pxpo train`` | :mod:`.train` |
| ``pxpo run`` | :mod:`.online` |
| ``pxpo evaluate`` | :mod:`.evaluate` |
| ``pxpo register`` | :mod:`.register` |
"""

from __future__ import annotations

from pathlib import Path


def report_path(explicit: str | Path | None, artifact: Path) -> Path:
    """Where a validation report goes: ``explicit`` if given, else ``<artifact>.validation.json`` beside it.

    The report is kept (also on failure) so a person can read which rows failed.
    """
    if explicit:
        return Path(explicit)
    artifact = Path(artifact)
    return artifact.parent / f"{artifact.name}.validation.json"
