"""pxpo label-studio push -> a person paints -> pull, against a real Label Studio server.

The server runs from its own environment (tests/labelstudio_server.py) on localhost with
SQLite. Annotations are created through the REST endpoint the labelling page posts to,
with the result JSON the page sends for brush strokes (its keys, and an RLE of four equal values
per pixel: the stroke's coverage, 255 where painted; the browser test checks this layout). The pulled maps are checked pixel by pixel against maps built here from the
same rectangles, independently of pxpo's conversion code.

Marked ``labelstudio``: skipped unless the server's environment exists
(``bash scripts/setup-labelstudio.sh``; ``scripts/test.sh`` creates it unless PXPO_LABEL_STUDIO=0). Under CI=true
(tests/prereq.py) a missing environment, or a missing chromium for the browser test, FAILS these tests:
``scripts/test.sh`` installs both there, and fails itself when it cannot.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

import labelstudio_server as lss
import prereq
from pxpo.cli import main
from pxpo.config import load_config
from pxpo.errors import PxpoInputError
from pxpo.trajectories import load_reward_maps, load_trajectories, make_meta, quantize_images, save_trajectories, Trajectories

pytestmark = pytest.mark.labelstudio


@pytest.fixture(scope="module", autouse=True)
def _label_studio_environment():
    """Before the (module-scoped) server starts: skip the module without the server's environment; fail under CI."""
    prereq.require(lss.label_studio_bin(), "no Label Studio environment (bash scripts/setup-labelstudio.sh)")

H = W = 16
N = 4
GOOD, BAD, NEUTRAL = 1.0, -0.5, 0.25


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = lss.start(tmp_path_factory.mktemp("labelstudio"))
    print(f"\nLabel Studio answered after {s.startup_s:.1f} s")
    yield s
    lss.stop(s)


@pytest.fixture
def traj_dir(tmp_path):
    g = torch.Generator().manual_seed(0)
    t = 3
    tr = Trajectories(
        latents=torch.randn(N, t + 1, 4, 4, 4, generator=g),
        log_probs=torch.randn(N, t, 4, 4, 4, generator=g),
        timesteps=torch.arange(t * 250, 0, -250),
        prompt_embeds=torch.randn(N, 8, 16, generator=g),
        negative_prompt_embeds=torch.randn(1, 8, 16, generator=g),
        prompts=[f"a handwritten digit {i}" for i in range(N)],
        seeds=list(range(N)),
        images=quantize_images(torch.rand(N, 3, H, W, generator=g)),
        meta=make_meta(model_path="m", revision=None, scheduler_config={}, num_steps=t, eta=1.0, guidance_scale=3.0, negative_prompt=""),
    )
    d = tmp_path / "traj"
    save_trajectories(tr, d)
    return d


def _cfg(server, project, monkeypatch, *extra):
    monkeypatch.setenv("PXPO_TEST_LS_TOKEN", server.token)
    return load_config(None, [
        f"label.url={server.url}", "label.token_env=PXPO_TEST_LS_TOKEN", f"label.project={project}",
        f"label.strengths={{good: {GOOD}, bad: {BAD}}}", f"label.neutral={NEUTRAL}",
        "reward.name=brightness_target", "reward.kwargs={layout: left_bright}", *extra,
    ])


def _rect(y0, y1, x0, x1):
    m = np.zeros((H, W), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def _web_page_result(mask, label):
    """The result JSON the labelling page posts for one brush stroke: the keys it sends, and an RLE of
    4 values per pixel all holding the stroke's coverage (test_a_person_paints_in_the_labelling_page
    checks this layout against a real stroke)."""
    from label_studio_sdk.converter import brush

    rgba = np.repeat(mask.astype(np.uint8)[:, :, None] * 255, 4, axis=2)
    return {
        "id": f"s{abs(hash((label, mask.tobytes()))) % 10**8}",
        "type": "brushlabels", "origin": "manual", "from_name": "reward", "to_name": "image",
        "image_rotation": 0, "original_width": W, "original_height": H,
        "value": {"format": "rle", "rle": [int(v) for v in brush.encode_rle(rgba.ravel())], "brushlabels": [label]},
    }


def _annotate(client, task_id, project_id, strokes):
    result = [_web_page_result(m, lab) for m, lab in strokes]
    return client.create_annotation(
        task_id, project_id, result, draft_id=0, parent_prediction=None, parent_annotation=None,
        started_at=time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
    )


def _paint(strokes):
    """The expected map, written out independently: neutral, then each stroke's value where it paints."""
    m = np.full((H, W), NEUTRAL, dtype=np.float64)
    for mask, lab in strokes:
        m[mask] = GOOD if lab == "good" else BAD
    return m


def test_push_annotate_pull_pixel_by_pixel(server, traj_dir, tmp_path, monkeypatch, capsys):
    from pxpo.labelstudio.client import LabelStudioClient
    from pxpo.stages.label_studio import pull, push

    t0 = time.monotonic()
    cfg = _cfg(server, "pxpo-e2e", monkeypatch)
    s = push(cfg, traj_dir)
    assert s["pushed"] == N and s["already"] == 0
    again = push(cfg, traj_dir)  # the same samples are not uploaded twice
    assert again["pushed"] == 0 and again["already"] == N and again["project_id"] == s["project_id"]

    client = LabelStudioClient(server.url, server.token)
    pid = s["project_id"]
    project = client.find_project("pxpo-e2e")
    assert "BrushLabels" in project["label_config"] and "$prompt" in project["label_config"]
    tasks = {t["data"]["pxpo_index"]: t for t in client.export_tasks(pid)}
    assert sorted(tasks) == list(range(N))
    assert tasks[2]["data"]["prompt"] == "a handwritten digit 2" and tasks[2]["data"]["image"].startswith("data:image/png;base64,")
    # pre-annotation from brightness_target: the brightest-scoring third painted good
    preds = client.request("GET", "/api/predictions/", task=tasks[0]["id"])
    pred = preds[0]["result"]
    assert preds[0]["model_version"] == "pxpo-brightness_target"
    assert {r["value"]["brushlabels"][0] for r in pred} == {"good", "bad"}

    # sample 0: two annotators; sample 1: a stroke painted over by a later one; 2 and 3: nobody
    a0 = [(_rect(0, 8, 0, 16), "good")]
    b0 = [(_rect(4, 16, 8, 16), "bad")]
    s1 = [(_rect(0, 16, 0, 10), "good"), (_rect(5, 9, 2, 14), "bad")]
    _annotate(client, tasks[0]["id"], pid, a0)
    _annotate(client, tasks[0]["id"], pid, b0)
    _annotate(client, tasks[1]["id"], pid, s1)

    with pytest.raises(PxpoInputError, match=r"2 of 4 samples have no finished annotation \(indices 2, 3\)"):
        pull(cfg, traj_dir, out=tmp_path / "rejected")
    assert not (tmp_path / "rejected").exists()

    _annotate(client, tasks[3]["id"], pid, [(_rect(10, 13, 3, 6), "good")])
    expected = {0: (_paint(a0) + _paint(b0)) / 2, 1: _paint(s1), 2: np.full((H, W), NEUTRAL), 3: _paint([(_rect(10, 13, 3, 6), "good")])}

    out = pull(_cfg(server, "pxpo-e2e", monkeypatch, "label.missing=neutral"), traj_dir, out=tmp_path / "neutral", validate=True)
    assert out["missing"] == [2] and out["annotations"] == 4
    maps, info = load_reward_maps(tmp_path / "neutral", N, (H, W))
    for i in range(N):
        np.testing.assert_array_equal(maps[i].double().numpy(), expected[i], err_msg=f"sample {i}")
    assert info["annotations"] == [2, 1, 0, 1] and info["labeller"] == "label_studio"

    out = pull(_cfg(server, "pxpo-e2e", monkeypatch, "label.missing=skip"), traj_dir, out=tmp_path / "skip")
    kept = load_trajectories(tmp_path / "skip")
    assert len(kept) == 3 and kept.prompts == ["a handwritten digit 0", "a handwritten digit 1", "a handwritten digit 3"]
    assert kept.meta["source_indices"] == [0, 1, 3]
    maps, _ = load_reward_maps(tmp_path / "skip", 3, (H, W))
    np.testing.assert_array_equal(maps[2].double().numpy(), expected[3])

    # the CLI: reject -> exit 2 with the missing samples named
    monkeypatch.setenv("PXPO_TEST_LS_TOKEN", server.token)
    args = [f"label.url={server.url}", "label.token_env=PXPO_TEST_LS_TOKEN", "label.project=pxpo-e2e"]
    capsys.readouterr()
    code = main(["label-studio", "pull", "--trajectories", str(traj_dir), "--out", str(tmp_path / "cli"), *args])
    assert code == 2 and "indices 2" in capsys.readouterr().err and not (tmp_path / "cli").exists()
    code = main(["label-studio", "pull", "--trajectories", str(traj_dir), "--out", str(tmp_path / "cli"), *args, "label.missing=neutral"])
    assert code == 0 and "not annotated (1): samples [2]" in capsys.readouterr().err
    print(f"push -> annotate -> pull: {time.monotonic() - t0:.1f} s after a {server.startup_s:.1f} s server start")


def _pair_stroke(side, mask, label):
    """A stroke on image A or B of the pairwise page: the page's result JSON, posted by that side's BrushLabels."""
    control, image = {"A": ("better_a", "image_a"), "B": ("better_b", "image_b")}[side]
    return {**_web_page_result(mask, label), "from_name": control, "to_name": image}


def _annotate_pair(client, task_id, project_id, strokes):
    return client.create_annotation(
        task_id, project_id, [_pair_stroke(*s) for s in strokes], draft_id=0, parent_prediction=None, parent_annotation=None,
        started_at=time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
    )


def _preference(strokes):
    """The expected preference map, written out independently: per image 0, then each stroke's strength; A - B, clipped."""
    side = {"A": np.zeros((H, W)), "B": np.zeros((H, W))}
    for s, mask, lab in strokes:
        side[s][mask] = GOOD if lab == "good" else BAD
    return np.clip(side["A"] - side["B"], -1, 1)


def test_pairs_push_annotate_pull_pixel_by_pixel(server, traj_dir, tmp_path, monkeypatch):
    """push --pairs -> strokes painted on both images of a pair -> pull --pairs, pixel by pixel (label.neutral does not apply)."""
    from pxpo.labelstudio.client import LabelStudioClient
    from pxpo.stages.label_studio import pull_pairs, push_pairs
    from pxpo.trajectories import load_preference_maps

    f = traj_dir / "samples.jsonl"  # sampled in pairs: pair 0 = (A 1, B 0), pair 1 = (A 2, B 3)
    tags = [(0, "B"), (0, "A"), (1, "A"), (1, "B")]
    f.write_text("".join(json.dumps({**json.loads(r), "pair": p, "side": sd}) + "\n" for r, (p, sd) in zip(f.read_text().splitlines(), tags)))
    cfg = _cfg(server, "pxpo-e2e", monkeypatch)
    s = push_pairs(cfg, traj_dir)
    assert s["pushed"] == 2 and s["pair_source"] == "fields" and push_pairs(cfg, traj_dir)["pushed"] == 0
    client = LabelStudioClient(server.url, server.token)
    pid = s["project_id"]
    project = client.find_project("pxpo-e2e-pairs")
    assert project["id"] == pid and "$image_a" in project["label_config"] and "better_b" in project["label_config"]
    tasks = {t["data"]["pxpo_pair"]: t for t in client.export_tasks(pid)}
    assert {p: (t["data"]["pxpo_a"], t["data"]["pxpo_b"]) for p, t in tasks.items()} == {0: (1, 0), 1: (2, 3)}
    preds = client.request("GET", "/api/predictions/", task=tasks[0]["id"])
    assert preds and {r["from_name"] for r in preds[0]["result"]} <= {"better_a", "better_b"} and preds[0]["model_version"] == "pxpo-brightness_target"

    # pair 0: two people, each painting on both images; pair 1: one person, over-painting on B
    p0a = [("A", _rect(0, 8, 0, 16), "good"), ("B", _rect(4, 12, 4, 12), "good")]
    p0b = [("B", _rect(0, 16, 10, 16), "good"), ("A", _rect(12, 16, 0, 6), "bad")]
    p1 = [("A", _rect(2, 6, 2, 14), "good"), ("B", _rect(0, 16, 0, 8), "bad"), ("B", _rect(0, 4, 0, 4), "good")]
    _annotate_pair(client, tasks[0]["id"], pid, p0a)
    with pytest.raises(PxpoInputError, match=r"1 of 2 pairs have no finished annotation \(pairs 1\)"):
        pull_pairs(cfg, traj_dir)
    _annotate_pair(client, tasks[0]["id"], pid, p0b)
    _annotate_pair(client, tasks[1]["id"], pid, p1)
    out = pull_pairs(cfg, traj_dir, out=tmp_path / "pairs", validate=True)
    assert out["missing"] == [] and out["annotations"] == 3
    maps, pairs, info = load_preference_maps(tmp_path / "pairs", (H, W))
    assert pairs.tolist() == [[1, 0], [2, 3]] and info["annotations"] == [2, 1] and info["project"] == "pxpo-e2e-pairs"
    np.testing.assert_array_equal(maps[0].double().numpy(), (_preference(p0a) + _preference(p0b)) / 2, err_msg="pair 0")
    np.testing.assert_array_equal(maps[1].double().numpy(), _preference(p1), err_msg="pair 1")
    # spot checks of the rule: A good / B unpainted averaged with nothing; A bad = B better; A good + B bad clipped to 1; B's later good
    assert maps[0][0, 0] == 0.5 and maps[0][14, 2] == -0.25 and maps[1][5, 5] == 1 and maps[1][5, 10] == 1 and maps[1][1, 1] == -1


def test_unknown_label_and_bad_token_are_input_errors(server, traj_dir, monkeypatch):
    from pxpo.labelstudio.client import LabelStudioClient
    from pxpo.stages.label_studio import pull, push

    cfg = _cfg(server, "pxpo-errors", monkeypatch, "label.pre_annotate=false", "label.missing=neutral")
    s = push(cfg, traj_dir)
    client = LabelStudioClient(server.url, server.token)
    task = next(t for t in client.export_tasks(s["project_id"]) if t["data"]["pxpo_index"] == 0)
    _annotate(client, task["id"], s["project_id"], [(_rect(0, 4, 0, 4), "good")])
    narrowed = _cfg(server, "pxpo-errors", monkeypatch, "label.strengths={bad: -1.0}", "label.missing=neutral")
    with pytest.raises(PxpoInputError, match="label 'good'.*has no strength"):
        pull(narrowed, traj_dir)
    monkeypatch.setenv("PXPO_TEST_LS_TOKEN", "wrong")
    with pytest.raises(PxpoInputError, match="HTTP 401"):
        pull(cfg.model_copy(), traj_dir)


def test_config_json_roundtrip_of_strengths():
    cfg = load_config(None, ["label.strengths={good: 2, meh: 0.5, bad: -1}"])
    assert json.loads(json.dumps(cfg.label.strengths)) == {"good": 2.0, "meh": 0.5, "bad": -1.0}


def _dark_trajectories(d, n: int, size: int, seed: int) -> None:
    """n dark random size x size images of one prompt saved as a trajectory directory at d (no pair fields)."""
    g = torch.Generator().manual_seed(seed)
    tr = Trajectories(
        latents=torch.randn(n, 3, 4, 4, 4, generator=g), log_probs=torch.randn(n, 2, 4, 4, 4, generator=g),
        timesteps=torch.tensor([500, 250]), prompt_embeds=torch.randn(n, 8, 16, generator=g), negative_prompt_embeds=torch.zeros(1, 8, 16),
        prompts=["a handwritten digit 7"] * n, seeds=[0] * n, images=quantize_images(torch.rand(n, 3, size, size, generator=g) * 0.3),
        meta=make_meta(model_path="m", revision=None, scheduler_config={}, num_steps=2, eta=1.0, guidance_scale=3.0, negative_prompt=""),
    )
    save_trajectories(tr, d)


def _paint_in_browser(server, project_id: int, task_id: int, shot, *side: str) -> None:
    """tests/labelstudio_browser.py (.venv-labelstudio's python: selenium; Debian's chromium + chromedriver) paints one
    'good' stroke on the task's page (on image ``side`` of a pairwise page) and submits; the screenshot must exist."""
    import os
    import shutil
    import subprocess
    import sys as _sys
    from pathlib import Path

    prereq.require((lss.ROOT / ".venv-labelstudio" / "bin" / "python").is_file(),
                   "needs .venv-labelstudio (with selenium): bash scripts/setup-labelstudio.sh")
    prereq.require(Path("/usr/bin/chromium").is_file() and Path("/usr/bin/chromedriver").is_file(),
                   "needs Debian's chromium and chromedriver at /usr/bin (apt-get install chromium chromium-driver)")
    r = subprocess.run(
        [str(lss.ROOT / ".venv-labelstudio" / "bin" / "python"), str(lss.ROOT / "tests" / "labelstudio_browser.py"), server.url,
         "pxpo@example.com", "pxpo-test-password", str(project_id), str(task_id), str(shot), *side],
        capture_output=True, text=True, timeout=240,
    )
    print(r.stdout[-2000:], r.stderr[-3000:], file=_sys.stderr)
    assert r.returncode == 0, r.stderr[-3000:]
    assert shot.is_file() and shot.stat().st_size > 10_000
    if os.environ.get("PXPO_SCREENSHOT_DIR"):
        shutil.copy(shot, os.environ["PXPO_SCREENSHOT_DIR"])


def test_a_person_paints_in_the_labelling_page(server, tmp_path, monkeypatch):
    """Headless Chromium logs in, paints one 'good' stroke on the labelling page and submits; pull sees it."""
    from pxpo.labelstudio.client import LabelStudioClient
    from pxpo.stages.label_studio import pull, push

    size = 128
    _dark_trajectories(tmp_path / "t", 1, size, seed=1)
    cfg = _cfg(server, "pxpo-browser", monkeypatch, "label.pre_annotate=false")
    s = push(cfg, tmp_path / "t")
    client = LabelStudioClient(server.url, server.token)
    task = client.export_tasks(s["project_id"])[0]
    _paint_in_browser(server, s["project_id"], task["id"], tmp_path / "labelling_page.png")
    ann = client.export_tasks(s["project_id"])[0]["annotations"][0]["result"]
    assert [r["type"] for r in ann] == ["brushlabels"] and set(ann[0]) == set(_web_page_result(np.zeros((2, 2), bool), "good"))
    from label_studio_sdk.converter import brush

    rgba = brush.decode_rle(ann[0]["value"]["rle"]).reshape(size, size, 4)
    assert (rgba == rgba[:, :, :1]).all() and rgba.max() == 255  # four equal values per pixel, as _web_page_result writes
    out = pull(cfg, tmp_path / "t", out=tmp_path / "labelled")
    assert out["annotations"] == 1
    maps, _ = load_reward_maps(tmp_path / "labelled", 1, (size, size))
    painted = maps[0] == GOOD
    assert painted.any() and (maps[0][~painted] == NEUTRAL).all()
    rows = painted.any(dim=1).nonzero().flatten()
    assert size * 0.25 < rows.float().mean() < size * 0.75  # the stroke went across the middle of the image


def test_a_person_paints_on_image_b_of_a_pair_in_the_labelling_page(server, tmp_path, monkeypatch):
    """Headless Chromium paints one 'good' stroke on image B of the pairwise page; pull --pairs puts -1 exactly there."""
    from pxpo.labelstudio.client import LabelStudioClient
    from pxpo.stages.label_studio import pull_pairs, push_pairs
    from pxpo.trajectories import load_preference_maps

    size = 128
    _dark_trajectories(tmp_path / "t", 2, size, seed=2)  # no pair fields: samples 0 and 1 are pair 0 (A, B)
    cfg = _cfg(server, "pxpo-browser", monkeypatch, "label.pre_annotate=false")
    s = push_pairs(cfg, tmp_path / "t")
    client = LabelStudioClient(server.url, server.token)
    task = client.export_tasks(s["project_id"])[0]
    _paint_in_browser(server, s["project_id"], task["id"], tmp_path / "pairwise_page.png", "B")
    ann = client.export_tasks(s["project_id"])[0]["annotations"][0]["result"]
    assert [(x["type"], x["from_name"], x["to_name"]) for x in ann] == [("brushlabels", "better_b", "image_b")]
    out = pull_pairs(cfg, tmp_path / "t", out=tmp_path / "labelled")
    assert out["annotations"] == 1
    maps, pairs, _ = load_preference_maps(tmp_path / "labelled", (size, size))
    assert pairs.tolist() == [[0, 1]]
    painted = maps[0] == -GOOD  # painted 'good' on B: B better there
    assert painted.any() and (maps[0][~painted] == 0).all()
    rows = painted.any(dim=1).nonzero().flatten()
    assert size * 0.25 < rows.float().mean() < size * 0.75  # the stroke went across the middle of the image
