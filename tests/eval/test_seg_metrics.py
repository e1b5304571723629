"""Segmentation metrics against a hand computation, with ignored pixels and absent classes."""

from __future__ import annotations

import math

import pytest
import torch
from tolerances import FP32_ONE_OP, approx

from explora.core.errors import DataError
from explora.eval.seg_metrics import mean_and_se, pixel_confusion, segmentation_metrics


def test_miou_hand_computed_with_ignore_and_absent_class():
    labels = torch.tensor([[0, 0, 1, 1], [1, 255, 255, 0]])
    preds = torch.tensor([[0, 1, 1, 1], [0, 3, 2, 0]])  # class 2 predicted once (on an ignored pixel), class 3 too
    cm = pixel_confusion(preds, labels, num_classes=4)
    # counted pixels: (0,0) (0,1) (1,1) (1,1) (1,0) (0,0) -> rows true, columns predicted
    assert cm.tolist() == [[2, 1, 0, 0], [1, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    m = segmentation_metrics(cm)
    iou0, iou1 = 2 / (2 + 1 + 1), 2 / (2 + 1 + 1)
    assert m["per_class_iou"][:2] == approx([100 * iou0, 100 * iou1], FP32_ONE_OP)
    assert m["per_class_iou"][2:] == [None, None]  # never in labels nor in counted predictions: left out
    assert m["miou"] == approx(100 * (iou0 + iou1) / 2, FP32_ONE_OP)
    assert m["per_class_f1"][0] == approx(100 * 4 / (4 + 1 + 1), FP32_ONE_OP)
    assert m["pixel_accuracy"] == approx(100 * 4 / 6, FP32_ONE_OP)
    assert m["num_pixels"] == 6


def test_a_predicted_but_absent_class_counts_as_zero():
    labels = torch.tensor([0, 0, 0, 1])
    preds = torch.tensor([0, 0, 2, 1])
    m = segmentation_metrics(pixel_confusion(preds, labels, 3))
    assert m["per_class_iou"] == approx([100 * 2 / 3, 100.0, 0.0], FP32_ONE_OP)
    assert m["miou"] == approx((200 / 3 + 100) / 3, FP32_ONE_OP)


def test_labels_out_of_range_are_named():
    with pytest.raises(DataError, match=r"range over \[0, 5\]; expected 0..2 or 255"):
        pixel_confusion(torch.zeros(3), torch.tensor([0, 5, 255]), 3)


def test_mean_and_standard_error():
    mean, se = mean_and_se([1.0, 2.0, 3.0, 6.0])
    assert mean == 3.0
    assert se == approx(math.sqrt(((4 + 1 + 0 + 9) / 3) / 4), FP32_ONE_OP)
    assert mean_and_se([5.0]) == (5.0, 0.0)
