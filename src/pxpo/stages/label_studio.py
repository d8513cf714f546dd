"""``pxpo label-studio push`` / ``pull``: people paint reward maps in Label Studio.

push: creates (or updates) the project ``label.project`` with brush labels
``label.strengths`` and uploads each sample of a trajectory artifact as a task
(the image as a PNG data URI, the prompt beside it, the sample's index and the
artifact's key), optionally pre-painted from ``reward.name``'s map. Samples
already in the project are not uploaded twice.

pull: exports the project's tasks, turns the finished annotations of this
artifact's samples into maps (docs/labelling.md: unpainted = ``label.neutral``,
a stroke sets its label's strength, annotators averaged) and writes
``reward_maps.safetensors`` through the same checks and validation as
``pxpo label``. Samples nobody annotated are reported and, by ``label.missing``,
rejected (exit 2), skipped (left out of ``--out``) or given a neutral map.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import torch

from ..config import Config
from ..errors import PxpoInputError


def artifact_key(d: Path) -> str:
    """A short id of a trajectory artifact (its meta.json and samples.jsonl), stored in each task."""
    h = hashlib.sha256()
    for name in ("meta.json", "samples.jsonl"):
        h.update((Path(d) / name).read_bytes())
    return h.hexdigest()[:16]


def _client(cfg: Config):
    from ..labelstudio.client import LabelStudioClient

    return LabelStudioClient.from_config(cfg.label.url, cfg.label.token_env)


def _png_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def push(cfg: Config, trajectories: Path) -> dict:
    """Upload the samples of ``trajectories`` to Label Studio.

    Returns:
        ``{"project_id", "project_url", "pushed", "already", "key"}``.
    """
    import json

    from ..labelstudio.brush import brush_result, label_config, prediction_strokes
    from ..trajectories import load_trajectories

    d = Path(trajectories)
    traj = load_trajectories(d)
    key = artifact_key(d)
    records = [json.loads(line) for line in (d / "samples.jsonl").read_text().splitlines() if line.strip()]
    client = _client(cfg)
    config_xml = label_config(cfg.label.strengths, cfg.label.neutral)
    project = client.find_project(cfg.label.project)
    if project is None:
        project = client.create_project(cfg.label.project, config_xml, description="pxpo: paint where each image is good or bad for its prompt")
    elif project.get("label_config") != config_xml:
        project = client.update_project(project["id"], label_config=config_xml)
    pid = project["id"]
    present = {t["data"].get("pxpo_index") for t in client.export_tasks(pid) if t.get("data", {}).get("pxpo_key") == key}
    todo = [i for i in range(len(traj)) if i not in present]
    maps = None
    if cfg.label.pre_annotate and todo:
        from ..labellers import make_reward
        from ..training.rollout import label_images

        idx = torch.as_tensor(todo)
        labeller = make_reward(cfg.reward)
        maps, _ = label_images(labeller, traj.images[idx], [traj.prompts[i] for i in todo], where=f"reward labeller {cfg.reward.describe()!r}")
    tasks = []
    for j, i in enumerate(todo):
        task = {"data": {"image": _png_data_uri(d / records[i]["image"]), "prompt": traj.prompts[i], "pxpo_index": i, "pxpo_key": key}}
        if maps is not None:
            strokes = prediction_strokes(maps[j], cfg.label.strengths)
            if strokes:
                task["predictions"] = [{"model_version": "pxpo-" + "+".join(c.key for c in cfg.reward.labellers()), "result": [brush_result(m, lab) for m, lab in strokes]}]
        tasks.append(task)
    for start in range(0, len(tasks), 50):
        client.import_tasks(pid, tasks[start : start + 50])
    return {"project_id": pid, "project_url": f"{client.url}/projects/{pid}/data", "pushed": len(tasks), "already": len(present), "key": key}


def pull(cfg: Config, trajectories: Path, *, out: Path | None = None, validate: bool = False, report: str | Path | None = None) -> dict:
    """Annotations of ``trajectories``' samples -> ``reward_maps.safetensors`` (see the module doc).

    Returns:
        ``{"num_samples", "annotated", "annotations", "missing": [indices], "reward_mean", "out"}``.
    """
    from ..labelstudio.brush import task_map
    from ..trajectories import load_trajectories
    from .label import write_maps

    d = Path(trajectories)
    traj = load_trajectories(d, with_images=False)
    n = len(traj)
    h, w = (int(v) for v in traj.meta["image_shape"][1:])
    key = artifact_key(d)
    client = _client(cfg)
    project = client.find_project(cfg.label.project)
    if project is None:
        raise PxpoInputError(f"Label Studio project {cfg.label.project!r}", f"not found at {client.url}", "run `pxpo label-studio push` first")
    maps: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}
    for task in client.export_tasks(project["id"]):
        data = task.get("data", {})
        if data.get("pxpo_key") != key:
            continue
        i = int(data["pxpo_index"])
        m, k = task_map(task, cfg.label.strengths, cfg.label.neutral, h, w, where=f"Label Studio task {task.get('id')} (sample {i})")
        if m is None:
            continue
        if i in maps:  # the same sample pushed twice by hand: pool the annotations
            m = (maps[i] * counts[i] + m * k) / (counts[i] + k)
            k += counts[i]
        maps[i], counts[i] = m, k
    missing = [i for i in range(n) if i not in maps]
    keep = None
    if missing and cfg.label.missing == "reject":
        shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
        raise PxpoInputError(
            f"Label Studio project {cfg.label.project!r}",
            f"{len(missing)} of {n} samples have no finished annotation (indices {shown})",
            "annotate them, or set label.missing=skip (with --out) or label.missing=neutral",
        )
    if missing and cfg.label.missing == "skip":
        if not out:
            raise PxpoInputError("--out", f"label.missing=skip drops {len(missing)} samples", "pass --out DIR for the reduced copy")
        keep = [i for i in range(n) if i in maps]
        if not keep:
            raise PxpoInputError(f"Label Studio project {cfg.label.project!r}", "no sample has a finished annotation", "annotate some samples first")
    order = keep if keep is not None else list(range(n))
    neutral = torch.full((h, w), float(cfg.label.neutral))
    stacked = torch.stack([maps.get(i, neutral) for i in order]).float()
    info = {
        "labeller": "label_studio",
        "project": cfg.label.project,
        "project_id": project["id"],
        "strengths": dict(cfg.label.strengths),
        "neutral": cfg.label.neutral,
        "annotations": [counts.get(i, 0) for i in order],
        "missing": missing,
        "missing_policy": cfg.label.missing,
    }
    target = write_maps(d, stacked, info, out=out, validate=validate, report=report, keep=keep)
    return {
        "num_samples": len(order), "annotated": len(maps), "annotations": sum(counts.values()), "missing": missing,
        "reward_mean": stacked.mean().item(), "out": str(target),
    }
