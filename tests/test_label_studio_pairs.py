"""The pairwise Label Studio task (pxpo.labelstudio.pairs; push/pull --pairs) without a server.

The conversion is checked pixel by pixel against maps written out here from the same
rectangles; the stages run against a small in-memory stand-in of the REST client (the
real-server round trip is tests/test_label_studio.py::test_pairs_push_annotate_pull_pixel_by_pixel).
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch

import prereq
from pxpo.cli import main
from pxpo.config import load_config
from pxpo.errors import PxpoInputError
from pxpo.trajectories import Trajectories, load_preference_maps, make_meta, quantize_images, save_trajectories

brush = prereq.import_module("label_studio_sdk.converter.brush", "pip install --no-deps label-studio-sdk==2.1.2 (scripts/setup.sh)")

from pxpo.labelstudio import pairs as lsp  # noqa: E402  (after the SDK check)

H, W = 12, 10
STRENGTHS = {"better": 1.0, "slightly": 0.5, "worse": -1.0}


def _rect(y0, y1, x0, x1):
    m = np.zeros((H, W), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def _stroke(side, mask, label):
    """A brush stroke as the labelling page stores it (4 equal values per pixel, 255 where painted)."""
    rgba = np.repeat(mask.astype(np.uint8)[:, :, None] * 255, 4, axis=2)
    control, image = {"A": ("better_a", "image_a"), "B": ("better_b", "image_b")}[side]
    return {"type": "brushlabels", "from_name": control, "to_name": image, "original_width": W, "original_height": H,
            "image_rotation": 0, "origin": "manual",
            "value": {"format": "rle", "rle": [int(v) for v in brush.encode_rle(rgba.ravel())], "brushlabels": [label]}}


def _expected(strokes):
    """Written out independently: each image 0, then each of its strokes' strength; A minus B, clipped."""
    side = {"A": np.zeros((H, W)), "B": np.zeros((H, W))}
    for s, mask, lab in strokes:
        side[s][mask] = STRENGTHS[lab]
    return np.clip(side["A"] - side["B"], -1, 1)


def test_a_painted_pair_gives_exactly_the_expected_map():
    strokes = [
        ("A", _rect(0, 6, 0, 5), "better"),      # A better: +1
        ("B", _rect(3, 9, 3, 8), "better"),      # B better: -1; where both: 0
        ("A", _rect(9, 12, 0, 4), "slightly"),   # +0.5
        ("B", _rect(10, 12, 2, 6), "worse"),     # B worse = A better: +1; with A slightly: 0.5 + 1 -> clipped to 1
        ("B", _rect(0, 2, 8, 10), "slightly"),   # -0.5
        ("A", _rect(0, 1, 9, 10), "better"),     # over B's slightly: 1 - 0.5 = 0.5
        ("A", _rect(4, 5, 0, 2), "slightly"),    # later stroke on A over its own earlier "better": 0.5 there
    ]
    ann = {"id": 1, "result": [_stroke(*s) for s in strokes]}
    m = lsp.preference_map(ann, STRENGTHS, H, W, where="t")
    exp = _expected(strokes)
    assert m.dtype == torch.float32 and m.shape == (H, W)
    np.testing.assert_array_equal(m.double().numpy(), exp)
    # spot checks of the rule itself, not only agreement with _expected
    assert m[0, 0] == 1 and m[4, 4] == 0 and m[8, 7] == -1 and m[11, 3] == 1 and m[10, 0] == 0.5
    assert m[1, 8] == -0.5 and m[0, 9] == 0.5 and m[4, 0] == 0.5 and m[6, 9] == 0


def test_annotators_are_averaged_and_cancelled_ones_ignored():
    a1 = [("A", _rect(0, 6, 0, 10), "better")]
    a2 = [("B", _rect(0, 12, 0, 5), "better")]
    task = {"annotations": [
        {"id": 1, "result": [_stroke(*s) for s in a1]},
        {"id": 2, "result": [_stroke(*s) for s in a2]},
        {"id": 3, "was_cancelled": True, "result": [_stroke("A", _rect(0, 12, 0, 10), "worse")]},
    ]}
    m, k = lsp.task_preference(task, STRENGTHS, H, W, where="t")
    assert k == 2
    np.testing.assert_array_equal(m.double().numpy(), (_expected(a1) + _expected(a2)) / 2)
    assert lsp.task_preference({"annotations": []}, STRENGTHS, H, W, where="t") == (None, 0)


def test_bad_annotations_are_input_errors():
    wrong_image = _stroke("A", _rect(0, 2, 0, 2), "better") | {"to_name": "image_b"}
    with pytest.raises(PxpoInputError, match="'better_a' stroke on 'image_b'"):
        lsp.preference_map({"result": [wrong_image]}, STRENGTHS, H, W, where="t")
    with pytest.raises(PxpoInputError, match="label 'meh'.*has no strength"):
        lsp.preference_map({"result": [_stroke("B", _rect(0, 2, 0, 2), "meh")]}, STRENGTHS, H, W, where="t")
    with pytest.raises(PxpoInputError, match="annotated at 12x10, the image is 12x12"):
        lsp.preference_map({"result": [_stroke("B", _rect(0, 2, 0, 2), "better")]}, STRENGTHS, H, 12, where="t")
    with pytest.raises(PxpoInputError, match=r"label.strengths.*outside \[-1, 1\]"):
        lsp.check_strengths({"better": 2.0})
    # strokes of other controls (e.g. a comment tool added by hand) are ignored
    other = _stroke("A", _rect(0, 2, 0, 2), "better") | {"from_name": "notes"}
    assert not lsp.preference_map({"result": [other]}, STRENGTHS, H, W, where="t").any()


def test_label_config_shows_both_images_with_a_brush_each():
    root = ET.fromstring(lsp.label_config(STRENGTHS))
    images = {e.get("name"): e.get("value") for e in root.iter("Image")}
    assert images == {"image_a": "$image_a", "image_b": "$image_b"}
    brushes = {e.get("name"): (e.get("toName"), [lab.get("value") for lab in e.iter("Label")]) for e in root.iter("BrushLabels")}
    assert brushes == {"better_a": ("image_a", list(STRENGTHS)), "better_b": ("image_b", list(STRENGTHS))}
    assert [e.get("value") for e in root.iter("Text")] == ["$prompt"]


def test_pairs_from_fields_or_consecutive_samples():
    recs = [{"pair": 1, "side": "B"}, {"pair": 0, "side": "A"}, {"pair": 1, "side": "A"}, {"pair": 0, "side": "B"}]
    assert lsp.sample_pairs(recs, "s.jsonl") == ([(0, 1, 3), (1, 2, 0)], "fields")
    assert lsp.sample_pairs([{}] * 4, "s.jsonl") == ([(0, 0, 1), (1, 2, 3)], "consecutive")
    bad = [
        ([{}] * 3, "3 samples without pair/side fields"),
        ([{"pair": 0, "side": "A"}, {}], r"s.jsonl:2.*without pair/side"),
        ([{"pair": "0", "side": "A"}, {"pair": 0, "side": "B"}], r"s.jsonl:1: field 'pair'.*not a non-negative integer"),
        ([{"pair": True, "side": "A"}], r"field 'pair'"),
        ([{"pair": 0, "side": "a"}, {"pair": 0, "side": "B"}], r"s.jsonl:1: field 'side'.*neither 'A' nor 'B'"),
        ([{"pair": 0, "side": "A"}, {"pair": 0, "side": "A"}], r"s.jsonl:2: field 'side'.*second A \(also sample 0\)"),
        ([{"pair": 0, "side": "A"}, {"pair": 0, "side": "B"}, {"pair": 4, "side": "B"}], r"pairs \[4\] lack an A or a B"),
    ]
    for records, match in bad:
        with pytest.raises(PxpoInputError, match=match):
            lsp.sample_pairs(records, "s.jsonl")


def test_pre_annotation_paints_the_strongest_third_on_the_favoured_image():
    d = torch.zeros(H, W)
    d[0:3, :] = 0.8      # 30 pixels: A clearly better
    d[3:6, 0:5] = -0.9   # 15 pixels: B clearly better
    d[6:9, :] = 0.01     # weak
    results = lsp.prediction_results(d, STRENGTHS)
    got = {(r["from_name"], r["to_name"], r["value"]["brushlabels"][0]):
           brush.decode_rle(r["value"]["rle"]).reshape(H, W, 4)[:, :, 3] == 255 for r in results}
    assert set(got) == {("better_a", "image_a", "better"), ("better_b", "image_b", "better")}
    np.testing.assert_array_equal(got[("better_a", "image_a", "better")], (d >= 0.8).numpy())
    np.testing.assert_array_equal(got[("better_b", "image_b", "better")], (d <= -0.9).numpy())
    assert lsp.prediction_results(torch.zeros(H, W), STRENGTHS) == []
    assert lsp.prediction_results(d, {"worse": -1.0}) == []


# --- the stages, against an in-memory stand-in of the Label Studio client ------------------------------------------


class FakeClient:
    url = "http://fake"

    def __init__(self):
        self.projects, self.tasks = {}, {}

    def find_project(self, title):
        return next((p for p in self.projects.values() if p["title"] == title), None)

    def create_project(self, title, label_config, description=""):
        pid = len(self.projects) + 1
        self.projects[pid] = {"id": pid, "title": title, "label_config": label_config}
        self.tasks[pid] = []
        return self.projects[pid]

    def update_project(self, pid, **fields):
        self.projects[pid].update(fields)
        return self.projects[pid]

    def import_tasks(self, pid, tasks):
        for t in tasks:
            self.tasks[pid].append({"id": 100 * pid + len(self.tasks[pid]), "annotations": [], **json.loads(json.dumps(t))})

    def export_tasks(self, pid):
        return json.loads(json.dumps(self.tasks[pid]))

    def annotate(self, pid, pair, strokes):
        task = next(t for t in self.tasks[pid] if t["data"]["pxpo_pair"] == pair)
        task["annotations"].append({"id": len(task["annotations"]) + 1, "result": [_stroke(*s) for s in strokes]})


def _traj_dir(tmp_path, n=6, fields=True):
    g = torch.Generator().manual_seed(0)
    tr = Trajectories(
        latents=torch.randn(n, 3, 4, 3, 3, generator=g), log_probs=torch.randn(n, 2, 4, 3, 3, generator=g),
        timesteps=torch.tensor([500, 250]), prompt_embeds=torch.randn(n, 8, 16, generator=g), negative_prompt_embeds=torch.zeros(1, 8, 16),
        prompts=[f"a digit {i // 2}" for i in range(n)], seeds=list(range(n)), images=quantize_images(torch.rand(n, 3, H, W, generator=g)),
        meta=make_meta(model_path="m", revision=None, scheduler_config={}, num_steps=2, eta=1.0, guidance_scale=3.0, negative_prompt=""),
    )
    d = tmp_path / "traj"
    save_trajectories(tr, d)
    if fields:  # pair-sampled layout, B before A in pair 0 and pair ids out of order
        f = d / "samples.jsonl"
        recs = [json.loads(x) for x in f.read_text().splitlines()]
        tags = [(0, "B"), (0, "A"), (2, "A"), (2, "B"), (1, "A"), (1, "B")]
        f.write_text("".join(json.dumps({**r, "pair": p, "side": s}) + "\n" for r, (p, s) in zip(recs, tags)))
    return d


@pytest.fixture
def fake(monkeypatch):
    from pxpo.stages import label_studio

    client = FakeClient()
    monkeypatch.setattr(label_studio, "_client", lambda cfg: client)
    return client


def _cfg(*extra):
    return load_config(None, ["label.project=px", f"label.strengths={json.dumps(STRENGTHS)}", "reward.name=brightness_target",
                              "reward.kwargs={layout: left_bright}", *extra])


def test_push_and_pull_pairs_through_the_stages(fake, tmp_path, capsys):
    from pxpo.stages.label_studio import pull_pairs, push_pairs

    d = _traj_dir(tmp_path)
    s = push_pairs(_cfg(), d)
    assert s["pushed"] == 3 and s["pair_source"] == "fields" and fake.projects[s["project_id"]]["title"] == "px-pairs"
    assert push_pairs(_cfg(), d)["pushed"] == 0  # nothing twice
    pid = s["project_id"]
    by_pair = {t["data"]["pxpo_pair"]: t for t in fake.tasks[pid]}
    assert {p: (t["data"]["pxpo_a"], t["data"]["pxpo_b"]) for p, t in by_pair.items()} == {0: (1, 0), 1: (4, 5), 2: (2, 3)}
    assert by_pair[1]["data"]["prompt"] == "a digit 2" and by_pair[1]["data"]["image_a"].startswith("data:image/png;base64,")
    assert all(t["predictions"][0]["model_version"] == "pxpo-brightness_target" for t in fake.tasks[pid])

    s0 = [("A", _rect(0, 6, 0, 10), "better"), ("B", _rect(3, 12, 0, 4), "slightly")]
    s2 = [("B", _rect(0, 12, 5, 10), "better")]
    fake.annotate(pid, 0, s0)
    fake.annotate(pid, 2, s2)
    with pytest.raises(PxpoInputError, match=r"1 of 3 pairs have no finished annotation \(pairs 1\)"):
        pull_pairs(_cfg(), d)
    assert not (d / "preference_maps.safetensors").exists()

    out = pull_pairs(_cfg("label.missing=neutral"), d, out=tmp_path / "neutral", validate=True)
    assert out["missing"] == [1] and out["num_pairs"] == 3
    maps, pairs, info = load_preference_maps(tmp_path / "neutral", (H, W))
    assert pairs.tolist() == [[1, 0], [4, 5], [2, 3]] and info["annotations"] == [1, 0, 1] and info["pair_ids"] == [0, 1, 2]
    np.testing.assert_array_equal(maps[0].double().numpy(), _expected(s0))
    np.testing.assert_array_equal(maps[1].numpy(), np.zeros((H, W)))
    np.testing.assert_array_equal(maps[2].double().numpy(), _expected(s2))
    assert (tmp_path / "neutral" / "preference_maps.validation.json").is_file()
    assert (tmp_path / "neutral" / "trajectories.safetensors").is_file() and not (d / "preference_maps.safetensors").exists()

    out = pull_pairs(_cfg("label.missing=skip"), d)  # in place: the trajectories stay whole, the file lists the annotated pairs
    maps, pairs, _ = load_preference_maps(d, (H, W))
    assert out["num_pairs"] == 2 and pairs.tolist() == [[1, 0], [2, 3]]
    np.testing.assert_array_equal(maps[1].double().numpy(), _expected(s2))

    # the CLI: push --pairs (all there already); pull: reject -> exit 2 naming the pair; with neutral -> 0
    capsys.readouterr()
    assert main(["label-studio", "push", "--pairs", "--trajectories", str(d), "label.project=px", f"label.strengths={json.dumps(STRENGTHS)}"]) == 0
    assert "pushed 0 pairs (3 already there; pairs from fields) to http://fake/projects/" in capsys.readouterr().out
    assert main(["label-studio", "pull", "--pairs", "--trajectories", str(d), "label.project=px", f"label.strengths={json.dumps(STRENGTHS)}"]) == 2
    assert "pairs 1" in capsys.readouterr().err
    code = main(["label-studio", "pull", "--pairs", "--trajectories", str(d), "--out", str(tmp_path / "cli"), "label.project=px",
                 f"label.strengths={json.dumps(STRENGTHS)}", "label.missing=neutral"])
    captured = capsys.readouterr()
    assert code == 0 and "not annotated (1): pairs [1]" in captured.err and "3 preference maps" in captured.out


def test_consecutive_pairs_and_stage_errors(fake, tmp_path):
    from pxpo.core.preference import pairs_are_aligned
    from pxpo.stages.label_studio import pull_pairs, push_pairs

    d = _traj_dir(tmp_path, n=4, fields=False)
    with pytest.raises(PxpoInputError, match="px-pairs.*not found"):
        pull_pairs(_cfg(), d)
    s = push_pairs(_cfg("label.pre_annotate=false"), d)
    assert s["pair_source"] == "consecutive" and s["pushed"] == 2
    assert all("predictions" not in t for t in fake.tasks[s["project_id"]])
    with pytest.raises(PxpoInputError, match="no pair has a finished annotation"):
        pull_pairs(_cfg("label.missing=skip"), d)
    with pytest.raises(PxpoInputError, match=r"label.strengths"):
        push_pairs(_cfg("label.strengths={good: 2.0}"), d)
    fake.annotate(s["project_id"], 0, [("B", _rect(0, 1, 0, 1), "better")])
    out = pull_pairs(_cfg("label.missing=neutral"), d)  # consecutive samples: the aligned pairs [2p, 2p + 1] pxpo train expects
    maps, pairs, info = load_preference_maps(d, (H, W))
    assert pairs.tolist() == [[0, 1], [2, 3]] and pairs_are_aligned(pairs, 4) and info["source"] == "people" and info["pair_source"] == "consecutive"
    assert maps[0][0, 0] == -1 and maps[0].abs().sum() == 1 and not maps[1].any()
    fake.tasks[s["project_id"]][1]["data"]["pxpo_b"] = 0  # a task that no longer matches the directory's pair
    fake.annotate(s["project_id"], 1, [("A", _rect(0, 1, 0, 1), "better")])
    with pytest.raises(PxpoInputError, match="samples 2, 0 are not pair 1"):
        pull_pairs(_cfg("label.missing=neutral"), d)


def test_a_directory_saved_as_aligned_pairs_is_read_from_its_fields(fake, tmp_path):
    """save_trajectories writes pair / side for a paired stage (meta "pairs"): push and pull use those fields."""
    from dataclasses import replace

    from pxpo.stages.label_studio import pull_pairs, push_pairs
    from pxpo.trajectories import load_trajectories

    src = _traj_dir(tmp_path, n=4, fields=False)
    d = tmp_path / "paired"
    tr = load_trajectories(src)
    save_trajectories(replace(tr, meta={**tr.meta, "pairs": {"shared_steps": 0}}), d)
    recs = [json.loads(x) for x in (d / "samples.jsonl").read_text().splitlines()]
    assert [(r["pair"], r["side"]) for r in recs] == [(0, "A"), (0, "B"), (1, "A"), (1, "B")]
    s = push_pairs(_cfg("label.pre_annotate=false"), d)
    assert s["pair_source"] == "fields" and s["pushed"] == 2
    fake.annotate(s["project_id"], 1, [("A", _rect(0, 12, 0, 10), "slightly")])
    pull_pairs(_cfg("label.missing=skip"), d)
    maps, pairs, _ = load_preference_maps(d, (H, W))
    assert pairs.tolist() == [[2, 3]] and (maps[0] == 0.5).all()
