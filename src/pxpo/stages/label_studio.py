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

push --pairs / pull --pairs (:func:`push_pairs`, :func:`pull_pairs`): the same for
pairs of samples in the project ``<label.project>-pairs``: A and B side by side,
a brush on each ("better here"); pull writes ``preference_maps.safetensors``
(one map in [-1, 1] per pair; the rule is in :mod:`pxpo.labelstudio.pairs`).
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
    project = _existing_project(client, cfg.label.project, "pxpo label-studio push")
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
        _pool(maps, counts, i, m, k)  # the same sample pushed twice by hand: pool the annotations
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


# --- pairs: where is image A better than image B? (pxpo.labelstudio.pairs; docs/labelling.md) ----------


def pairs_project(cfg: Config) -> str:
    """The pairwise project's title: ``<label.project>-pairs`` (its labelling page differs from the painted-map one)."""
    return f"{cfg.label.project}-pairs"


def _pairs_of(d: Path) -> tuple[list[tuple[int, int, int]], str, list[dict]]:
    """The pairs of a trajectory directory (:func:`pxpo.labelstudio.pairs.sample_pairs`), how they were found, the records."""
    import json

    from ..labelstudio.pairs import sample_pairs

    f = d / "samples.jsonl"
    records = []
    for n, line in enumerate(f.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise PxpoInputError(f"{f}:{n}", f"not valid JSON ({e.msg})", "write the trajectories again with `pxpo sample`") from None
    return (*sample_pairs(records, str(f)), records)


def push_pairs(cfg: Config, trajectories: Path) -> dict:
    """Upload the pairs of ``trajectories`` (A and B side by side) to the project ``<label.project>-pairs``.

    With ``label.pre_annotate`` each pair comes pre-painted from ``reward.name``'s maps of A and B
    (:func:`pxpo.labelstudio.pairs.prediction_results`). Pairs already in the project are not uploaded twice.

    Returns:
        ``{"project_id", "project_url", "pushed", "already", "key", "pair_source"}``.
    """
    from ..labelstudio.pairs import check_strengths, label_config, pair_prompt, prediction_results
    from ..trajectories import load_trajectories

    d = Path(trajectories)
    traj = load_trajectories(d)
    strengths = check_strengths(cfg.label.strengths)
    pairs, source, records = _pairs_of(d)
    key = artifact_key(d)
    client = _client(cfg)
    title = pairs_project(cfg)
    config_xml = label_config(strengths)
    project = client.find_project(title)
    if project is None:
        project = client.create_project(title, config_xml, description="pxpo: paint where image A is better than image B, and where B is better than A")
    elif project.get("label_config") != config_xml:
        project = client.update_project(project["id"], label_config=config_xml)
    pid = project["id"]
    present = {t["data"].get("pxpo_pair") for t in client.export_tasks(pid) if t.get("data", {}).get("pxpo_key") == key}
    todo = [p for p in pairs if p[0] not in present]
    diffs = None
    if cfg.label.pre_annotate and todo:
        from ..labellers import make_reward
        from ..training.rollout import label_images

        idx = torch.as_tensor([i for _, a, b in todo for i in (a, b)])
        maps, _ = label_images(make_reward(cfg.reward), traj.images[idx], [traj.prompts[i] for i in idx.tolist()], where=f"reward labeller {cfg.reward.describe()!r}")
        diffs = maps[0::2] - maps[1::2]
    tasks = []
    for j, (p, a, b) in enumerate(todo):
        data = {
            "image_a": _png_data_uri(d / records[a]["image"]), "image_b": _png_data_uri(d / records[b]["image"]),
            "prompt": pair_prompt(traj.prompts[a], traj.prompts[b]), "pxpo_pair": p, "pxpo_a": a, "pxpo_b": b, "pxpo_key": key,
        }
        task: dict = {"data": data}
        if diffs is not None:
            result = prediction_results(diffs[j], strengths)
            if result:
                task["predictions"] = [{"model_version": "pxpo-" + "+".join(c.key for c in cfg.reward.labellers()), "result": result}]
        tasks.append(task)
    for start in range(0, len(tasks), 50):
        client.import_tasks(pid, tasks[start : start + 50])
    return {"project_id": pid, "project_url": f"{client.url}/projects/{pid}/data", "pushed": len(tasks), "already": len(present),
            "key": key, "pair_source": source}


def pull_pairs(cfg: Config, trajectories: Path, *, out: Path | None = None, validate: bool = False, report: str | Path | None = None) -> dict:
    """Annotations of the pairs of ``trajectories`` -> ``preference_maps.safetensors`` (P maps in [-1, 1], pairs [A, B]).

    Pairs nobody annotated, by ``label.missing``: ``reject`` (exit 2, nothing written), ``skip`` (left out of
    the file; the trajectories stay whole, so no --out is needed) or ``neutral`` (a map of zeros: no preference).

    Returns:
        ``{"num_pairs", "annotated", "annotations", "missing": [pair ids], "preference_mean", "out"}``.
    """
    import shutil

    from ..labelstudio.pairs import check_strengths, task_preference
    from ..storage import atomic_dir
    from ..trajectories import PREFERENCES, load_trajectories, save_preference_maps
    from . import report_path

    d = Path(trajectories)
    traj = load_trajectories(d, with_images=False)
    h, w = (int(v) for v in traj.meta["image_shape"][1:])
    strengths = check_strengths(cfg.label.strengths)
    pairs, source, _ = _pairs_of(d)
    members = {p: (a, b) for p, a, b in pairs}
    key = artifact_key(d)
    client = _client(cfg)
    title = pairs_project(cfg)
    project = _existing_project(client, title, "pxpo label-studio push --pairs")
    maps: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}
    for task in client.export_tasks(project["id"]):
        data = task.get("data", {})
        if data.get("pxpo_key") != key:
            continue
        p = int(data["pxpo_pair"])
        where = f"Label Studio task {task.get('id')} (pair {p})"
        if members.get(p) != (data.get("pxpo_a"), data.get("pxpo_b")):
            raise PxpoInputError(where, f"samples {data.get('pxpo_a')}, {data.get('pxpo_b')} are not pair {p} of {d}", "push the pairs again")
        m, k = task_preference(task, strengths, h, w, where=where)
        if m is None:
            continue
        _pool(maps, counts, p, m, k)  # the same pair pushed twice by hand: pool the annotations
    missing = [p for p, _, _ in pairs if p not in maps]
    if missing and cfg.label.missing == "reject":
        shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
        raise PxpoInputError(
            f"Label Studio project {title!r}", f"{len(missing)} of {len(pairs)} pairs have no finished annotation (pairs {shown})",
            "annotate them, or set label.missing=skip (leave them out) or label.missing=neutral (no preference)",
        )
    order = [p for p, _, _ in pairs if p in maps or cfg.label.missing == "neutral"]
    if not order:
        raise PxpoInputError(f"Label Studio project {title!r}", "no pair has a finished annotation", "annotate some pairs first")
    stacked = torch.stack([maps.get(p, torch.zeros((h, w))) for p in order]).float()
    index = torch.tensor([members[p] for p in order], dtype=torch.long)
    info = {
        "labeller": "label_studio", "source": "people", "project": title, "project_id": project["id"], "strengths": strengths,
        "rule": "per annotation clip(map_A - map_B, -1, 1), unpainted 0; annotators averaged", "pair_ids": order, "pair_source": source,
        "annotations": [counts.get(p, 0) for p in order], "missing": missing, "missing_policy": cfg.label.missing,
    }
    target = Path(out) if out else d
    result = None
    if validate:  # the reward-map suite with the range [-1, 1]; the report is kept on failure, nothing is written
        from ..validation import check, validate_reward_maps

        result = validate_reward_maps(stacked, num_samples=len(order), height=h, width=w, value_range=(-1.0, 1.0))
        if not result.success:
            check(result, report_path(report, target / "preference_maps"))
    if out:
        with atomic_dir(target) as tmp:
            shutil.copytree(d, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(PREFERENCES, "*.validation.json"))
            save_preference_maps(tmp, stacked, index, info)
    else:
        save_preference_maps(d, stacked, index, info)
    if result is not None:  # after the copy is in place (an --out directory is replaced whole)
        result.save(report_path(report, target / "preference_maps"))
    return {"num_pairs": len(order), "annotated": len(maps), "annotations": sum(counts.values()), "missing": missing,
            "preference_mean": stacked.mean().item(), "out": str(target)}


def _existing_project(client, title: str, push_command: str) -> dict:
    """The Label Studio project named ``title``; a clear error when nobody pushed it yet."""
    project = client.find_project(title)
    if project is None:
        raise PxpoInputError(f"Label Studio project {title!r}", f"not found at {client.url}", f"run `{push_command}` first")
    return project


def _pool(maps: dict, counts: dict, key: int, m: torch.Tensor, k: int) -> None:
    """Add map ``m`` (H, W), the mean of ``k`` annotations, to ``maps[key]``: the annotation-weighted mean of all so far."""
    if key in maps:
        m = (maps[key] * counts[key] + m * k) / (counts[key] + k)
        k += counts[key]
    maps[key], counts[key] = m, k
