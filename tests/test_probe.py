"""`tggbc probe`: the dense head's proposals near each object, on cases checked by hand."""

import math

import numpy as np
import pytest
import torch

from tggbc.detector.dense import peak_mask
from tggbc.detector.probe import cell_depth_errors, decoder_depth_errors, format_summary, peak_errors, summarise

STRIDE = 16


def grids():
    """One camera, a 4 x 11 grid: scores, peaks and regression all zero."""
    score = np.zeros((1, 4, 11), np.float32)
    regression = np.zeros((1, 3, 4, 11), np.float32)
    return score, regression


def test_peak_errors_by_hand():
    score, regression = grids()
    # Object A: centre at pixel (88, 29.5), cell (row 1, column 5), depth 20 m. The peak sits in the
    # neighbouring cell (row 1, column 6) and predicts offset (0.25, -0.25) cells and depth 22 m:
    # centre ((6.5 + 0.25) * 16, (1.5 - 0.25) * 16) = (108, 20), 20 px right and 9.5 px up.
    score[0, 1, 6] = 0.9
    regression[0, :, 1, 6] = [0.25, -0.25, math.log(22.0)]
    # A stronger peak two cells from A is outside its window and does not count for it.
    score[0, 1, 3] = 0.95
    # Object B: cell (row 3, column 9); its one neighbouring peak is below the threshold.
    score[0, 2, 9] = 0.2
    # Object C: cell (row 0, column 0) at the border, no peak near it.
    peak = peak_mask(torch.from_numpy(score)).numpy() & (score > 0)
    uv = np.array([[88.0, 29.5], [150.0, 60.0], [3.0, 3.0]])
    found, pixel, depth, cell = peak_errors(
        score, peak, regression, np.zeros(3, int), uv, np.array([20.0, 10, 10]), STRIDE
    )
    assert found.tolist() == [True, False, False]
    assert cell.tolist() == [1 * 11 + 6, -1, -1]  # camera 0, row 1, column 6
    assert pixel[0] == pytest.approx(math.hypot(20.0, 9.5), rel=1e-6)
    assert depth[0] == pytest.approx(22.0 / 20.0 - 1.0, rel=1e-6)
    assert np.isnan(pixel[1:]).all() and np.isnan(depth[1:]).all()
    # With a lower threshold B's peak counts: it predicts its cell centre (152, 40) at exp(0) = 1 m.
    found, pixel, depth, cell = peak_errors(
        score, peak, regression, np.zeros(3, int), uv, np.array([20.0, 10, 10]), STRIDE, threshold=0.1
    )
    assert found.tolist() == [True, True, False] and cell.tolist() == [17, 2 * 11 + 9, -1]
    assert pixel[1] == pytest.approx(math.hypot(2.0, 20.0)) and depth[1] == pytest.approx(-0.9)


def test_decoder_depth_errors_by_hand():
    # Two cameras; camera 1 looks along the lidar y axis (depth = y), camera 0 along x (depth = x).
    lidar2img = np.zeros((2, 4, 4))
    lidar2img[:, 3, 3] = 1.0
    lidar2img[0, 2, 0] = 1.0
    lidar2img[1, 2, 1] = 1.0
    # Queries came from cells 7, 50 and 3; their boxes sit at x = 12, y = 30 and anywhere.
    selected = np.array([7, 50, 3])
    center = np.array([[12.0, 99.0, 0.0], [-5.0, 30.0, 1.0], [0.0, 0.0, 0.0]])
    # Object 0: peak cell 7 in camera 0, true depth 10 -> box depth 12: +0.2. Object 1: cell 50 in
    # camera 1, true depth 40 -> 30: -0.25. Object 2 has no peak; object 3's peak was not selected.
    error = decoder_depth_errors(
        np.array([7, 50, -1, 8]), selected, center, np.array([0, 1, 0, 0]), np.array([10.0, 40, 5, 5]), lidar2img
    )
    assert error[:2] == pytest.approx([0.2, -0.25]) and np.isnan(error[2:]).all()


def test_peak_mask_keeps_only_local_maxima():
    score = torch.tensor([[0.1, 0.5, 0.2, 0.0], [0.3, 0.4, 0.1, 0.6]])
    assert peak_mask(score).tolist() == [[False, True, False, False], [False, False, False, True]]
    batched = peak_mask(score.expand(2, 3, 2, 4))
    assert batched.shape == (2, 3, 2, 4) and (batched == peak_mask(score)).all()


def test_summarise_by_band():
    distance = np.array([5.0, 7.0, 15.0, 45.0, 60.0])  # 60 m lies beyond the last band
    found = np.array([True, False, True, True, True])
    pixel = np.array([1.0, np.nan, 3.0, 8.0, 9.0])
    depth = np.array([-0.1, np.nan, 0.02, -0.3, 0.5])
    s = summarise(distance, found, pixel, depth)
    assert s["objects"] == [2, 1, 0, 0, 1]
    assert s["found"][:2] == [0.5, 1.0] and math.isnan(s["found"][2]) and s["found"][4] == 1.0
    assert s["pixel_error"][0] == 1.0 and s["depth_error"][0] == pytest.approx(0.1)
    assert s["depth_bias"][0] == pytest.approx(-0.1) and s["depth_bias"][4] == pytest.approx(-0.3)
    assert "decoder_depth_error" not in s
    # The decoder's error: median |error| over found objects whose peak became a query (NaN: it did not).
    decoder = np.array([0.3, np.nan, np.nan, -0.1, 0.2])
    s = summarise(distance, found, pixel, depth, decoder)
    assert s["decoder_depth_error"][0] == pytest.approx(0.3) and s["decoder_depth_error"][4] == pytest.approx(0.1)
    assert math.isnan(s["decoder_depth_error"][1])  # its one object's peak was not selected
    # Extra columns: the same median |error| over the found objects where they were measured.
    road = np.array([0.05, 9.0, -0.04, -0.2, np.nan])  # object 1 was not found: its value is ignored
    s = summarise(distance, found, pixel, depth, extra={"ground_depth_error": road})
    assert s["ground_depth_error"][0] == pytest.approx(0.05) and s["ground_depth_error"][1] == pytest.approx(0.04)
    assert math.isnan(s["ground_depth_error"][3]) and s["ground_depth_error"][4] == pytest.approx(0.2)  # 30-40 m: empty
    assert "decoder_depth_error" not in s
    assert "road |depth err|" in format_summary(s) and "decoder" not in format_summary(s)


def test_cell_depth_errors_by_hand():
    regression = np.zeros((2, 6, 4, 11), np.float32)
    regression[1, 4, 2, 7] = math.log(33.0)  # camera 1, row 2, column 7: the road says 33 m
    regression[1, 3, 2, 7] = math.log(27.0)  # and the direct estimate 27 m
    cell = np.array([(1 * 4 + 2) * 11 + 7, -1])
    depth = np.array([30.0, 12.0])
    road = cell_depth_errors(regression, 4, cell, depth)
    assert road[0] == pytest.approx(0.1, rel=1e-5) and math.isnan(road[1])
    assert cell_depth_errors(regression, 3, cell, depth)[0] == pytest.approx(-0.1, rel=1e-5)


def test_probe_refuses_to_overwrite_its_output(tmp_path):
    import argparse

    from tggbc.detector.probe import add_arguments, run

    out = tmp_path / "probe.json"
    out.write_text("mine")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--data", str(tmp_path), "--weights", "missing.safetensors", "--out", str(out)])
    with pytest.raises(FileExistsError, match="--force"):
        run(args)
    assert out.read_text() == "mine"
    with pytest.raises(SystemExit, match="--max-frames"):
        run(parser.parse_args(["--data", str(tmp_path), "--weights", "w", "--max-frames", "0"]))
