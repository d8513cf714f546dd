"""Trackers (``pxpo.tracking``): the run directory's images beside metrics.jsonl, truncation on resume, fan-out."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pxpo.tracking import FanOut, JsonlTracker, NullTracker, image_steps, to_pil


def test_jsonl_tracker_writes_images_per_step_and_truncates_them_with_the_metrics(tmp_path):
    t = JsonlTracker(tmp_path)
    for step in range(4):
        t.log_metrics({"reward_mean": step / 10}, step=step)
        t.log_image(torch.full((3, 4, 6), step / 4), "probe_samples", step=step)  # CHW float
        if step % 2:
            t.log_image(Image.new("RGB", (5, 5), (step, 0, 0)), "reward_map_mean", step=step)
    steps = image_steps(tmp_path)
    assert {k: [s for s, _ in v] for k, v in steps.items()} == {"probe_samples": [0, 1, 2, 3], "reward_map_mean": [1, 3]}
    assert steps["probe_samples"][2][1] == tmp_path / "images" / "probe_samples" / "step_0002.png"
    with Image.open(steps["probe_samples"][2][1]) as im:
        assert im.size == (6, 4) and im.getpixel((0, 0)) == (128, 128, 128)
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]  # written to a temporary file, renamed

    t.truncate(2)  # a run resumed at epoch 2 logs epochs 2, 3 again
    assert {k: [s for s, _ in v] for k, v in image_steps(tmp_path).items()} == {"probe_samples": [0, 1], "reward_map_mean": [1]}
    assert [h["epoch"] for h in t.history()] == [0, 1]


def test_image_names_are_one_directory_level(tmp_path):
    with pytest.raises(ValueError, match="names a directory"):
        JsonlTracker(tmp_path).log_image(np.zeros((2, 2), np.uint8), "../escape", step=0)


def test_to_pil_takes_files_arrays_and_tensors(tmp_path):
    Image.new("RGBA", (3, 2)).save(tmp_path / "a.png")
    assert to_pil(tmp_path / "a.png").mode == "RGB"
    assert to_pil(np.zeros((2, 3, 3), np.uint8)).size == (3, 2)  # HWC uint8
    assert to_pil(torch.ones(1, 3, 2, 3)).getpixel((0, 0)) == (255, 255, 255)  # NCHW float, N = 1
    assert to_pil(np.full((2, 3), 0.5)).mode == "L"


def test_fan_out_sends_everything_and_reads_the_first_history(tmp_path):
    a = JsonlTracker(tmp_path / "a")
    f = FanOut(a, JsonlTracker(tmp_path / "b"), NullTracker())
    f.log_params({"seed": 0})
    f.log_metrics({"reward_mean": 0.5}, step=0)
    f.log_image(np.zeros((2, 2), np.uint8), "m", step=0)
    f.truncate(1)
    assert f.history() == [{"epoch": 0, "reward_mean": 0.5}]
    for d in ("a", "b"):
        assert json.loads((tmp_path / d / "params.json").read_text()) == {"seed": 0}
        assert (tmp_path / d / "images" / "m" / "step_0000.png").is_file()
