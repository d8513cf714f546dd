"""The embedded default's data: coloured digits, and a digit classifier that reads any ink colour."""

import numpy as np
import torch

from pxpo.embedded.digits import digits_dataset, hsv_colours
from pxpo.labellers import classify_images, digit_classifier


def test_hsv_colours_primary_hues():
    rgb = hsv_colours(torch.tensor([0.0, 1 / 3, 2 / 3, 0.5]), torch.ones(4))
    assert torch.allclose(rgb, torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [0, 1, 1]]), atol=1e-6)
    assert torch.allclose(hsv_colours(torch.tensor([0.3]), torch.zeros(1)), torch.ones(1, 3))  # no saturation: white


def test_coloured_digits_are_the_white_ones_in_one_colour_each():
    white, labels = digits_dataset(16)
    coloured, clabels = digits_dataset(16, "colours", copies=2, seed=1)
    assert coloured.shape == (2 * white.shape[0], 3, 16, 16) and torch.equal(clabels, labels.repeat(2))
    w = (white[:, :1] + 1) / 2  # (N, 1, S, S) ink strength
    c = (coloured + 1) / 2
    ink = w.repeat(2, 1, 1, 1)
    colour = c.flatten(2).amax(2) / ink.flatten(2).amax(2)  # (2N, 3): each image's ink colour
    assert torch.allclose(c, ink * colour[:, :, None, None], atol=1e-5)  # one colour per image, the digit's strokes kept
    assert torch.allclose(colour.amax(1), torch.ones(len(colour)), atol=1e-5)  # fully bright
    hue_spread = colour.std(0)
    assert (hue_spread > 0.3).all()  # every channel varies across images: many hues, not one
    assert not torch.equal(coloured[: len(white)], coloured[len(white):])  # copies get their own colours


def test_classifier_reads_digits_in_any_ink_colour():
    clf = digit_classifier()
    white, labels = digits_dataset(16)
    coloured, _ = digits_dataset(16, "colours", copies=1, seed=0)
    acc_white = float((classify_images(clf, (white + 1) / 2) == labels.numpy()).mean())
    acc_colour = float((classify_images(clf, (coloured + 1) / 2) == labels.numpy()).mean())
    assert acc_white > 0.9
    assert np.isclose(acc_colour, acc_white, atol=0.01)
