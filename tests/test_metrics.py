"""Metrics against confusion matrices and scores computed by hand."""

import math

import numpy as np
import pytest
import torch

from fastfcn.errors import InputError
from fastfcn.metrics import ConfusionMatrix, confusion_matrix, format_table, scores


def test_confusion_matrix_by_hand_with_ignore():
    gt = np.array([[0, 0, 1], [1, 2, 255]])
    pr = np.array([[0, 1, 1], [1, 0, 2]])
    # (gt, pred) pairs: (0,0) (0,1) (1,1) (1,1) (2,0); the 255 pixel is skipped.
    want = np.array([[1, 1, 0], [0, 2, 0], [1, 0, 0]])
    np.testing.assert_array_equal(confusion_matrix(gt, pr, 3), want)
    np.testing.assert_array_equal(confusion_matrix(torch.from_numpy(gt), torch.from_numpy(pr), 3), want)


def test_scores_by_hand():
    hist = np.array([[3, 1, 0], [2, 4, 0], [0, 0, 0]])  # class 2 absent from GT and prediction
    r = scores(hist)
    assert r["pixel_acc"] == pytest.approx(7 / 10)
    assert r["mean_acc"] == pytest.approx((3 / 4 + 4 / 6) / 2)  # class 2 has no accuracy: excluded
    iu0, iu1 = 3 / (4 + 5 - 3), 4 / (6 + 5 - 4)
    assert r["mean_iu"] == pytest.approx((iu0 + iu1) / 2)  # not /3: absent classes are nan, excluded
    assert r["fw_iu"] == pytest.approx(0.4 * iu0 + 0.6 * iu1)
    assert math.isnan(r["per_class_iu"][2]) and math.isnan(r["per_class_acc"][2])
    np.testing.assert_array_equal(r["pixels"], [4, 6, 0])


def test_class_predicted_but_absent_from_gt_counts_as_zero_iu():
    gt = np.array([0, 0, 0, 1])
    pr = np.array([0, 0, 2, 1])
    r = scores(confusion_matrix(gt, pr, 3))
    assert r["per_class_iu"][2] == 0.0  # a false positive class: IU 0, part of the mean
    assert r["mean_iu"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert r["mean_acc"] == pytest.approx((2 / 3 + 1) / 2)  # no GT pixels of class 2: no accuracy


def test_perfect_and_all_wrong():
    gt = np.random.default_rng(0).integers(0, 4, (2, 7, 13))
    r = scores(confusion_matrix(gt, gt, 4))
    assert r["pixel_acc"] == r["mean_acc"] == r["mean_iu"] == r["fw_iu"] == 1.0
    r = scores(confusion_matrix(gt, (gt + 1) % 4, 4))
    assert r["pixel_acc"] == r["mean_iu"] == 0.0


def test_accumulates_over_batches():
    rng = np.random.default_rng(1)
    gt, pr = rng.integers(0, 5, (6, 9, 11)), rng.integers(0, 5, (6, 9, 11))
    gt[0, :2] = 255
    cm = ConfusionMatrix(5)
    for i in range(6):
        cm.update(gt[i], pr[i])
    np.testing.assert_array_equal(cm.matrix, confusion_matrix(gt, pr, 5))
    assert cm.matrix.sum() == gt.size - 22


def test_matches_fcn_score_py():
    # The FCN reference implementation (score.py: fast_hist + nan-means), written out here.
    rng = np.random.default_rng(2)
    n = 6
    gt, pr = rng.integers(0, n - 1, 5000), rng.integers(0, n, 5000)  # class 5 never in GT
    k = (gt >= 0) & (gt < n)
    hist = np.bincount(n * gt[k] + pr[k], minlength=n * n).reshape(n, n)
    with np.errstate(divide="ignore", invalid="ignore"):
        iu = np.diag(hist) / (hist.sum(1) + hist.sum(0) - np.diag(hist))
        acc = np.diag(hist) / hist.sum(1)
    freq = hist.sum(1) / hist.sum()
    r = scores(confusion_matrix(gt, pr, n))
    assert r["mean_iu"] == pytest.approx(np.nanmean(iu))
    assert r["mean_acc"] == pytest.approx(np.nanmean(acc))
    assert r["fw_iu"] == pytest.approx((freq[freq > 0] * iu[freq > 0]).sum())


def test_bad_inputs():
    with pytest.raises(InputError, match="same shape"):
        confusion_matrix(np.zeros((2, 3)), np.zeros((3, 2)), 2)
    with pytest.raises(InputError, match="outside 0..1"):
        confusion_matrix(np.array([0, 7]), np.array([0, 1]), 2)
    with pytest.raises(InputError, match="predictions"):
        confusion_matrix(np.array([0, 1]), np.array([0, 2]), 2)
    with pytest.raises(InputError, match="square"):
        scores(np.zeros((2, 3)))


def test_empty_and_table():
    r = scores(np.zeros((3, 3), np.int64))
    assert math.isnan(r["mean_iu"]) and math.isnan(r["pixel_acc"])
    text = format_table(scores(np.array([[5, 1], [0, 4]])), ["background", "thing"])
    assert "thing" in text and "mean IU" in text
