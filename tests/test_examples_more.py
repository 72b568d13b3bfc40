"""The RNN, Flax and schedule and accumulation examples, run small, show what they claim."""

from pathlib import Path

import numpy as np
import pytest
from _examples import load


def test_exploding_rnn_clipping_gets_past_the_cliff(tmp_path: Path) -> None:
    png = tmp_path / "rnn.png"
    rows = load("exploding_rnn.py").main(["--smoke", "--out", str(png)])
    plain, clipped = rows["plain SGD"], rows["clipped SGD"]
    assert clipped["success"] >= plain["success"]
    assert clipped["success"] >= 0.75
    # Plain SGD takes steps as large as the cliff's gradient; clipped SGD never more than lr * c.
    assert plain["max_step"] > 10 * clipped["max_step"]
    assert clipped["max_step"] <= 2.0 * 0.25 * (1 + 1e-5)
    assert png.stat().st_size > 10_000


def test_flax_nnx_logs_stats_every_step_and_learns_digits() -> None:
    result = load("flax_nnx.py").main(["--smoke"])
    assert result["test_accuracy"] > 0.8
    log = result["log"]
    assert len(log) == 120
    for row in log:
        assert {"grad_norm", "clipped", "nonfinite"} <= set(row)
        assert np.isfinite(row["grad_norm"]) and row["nonfinite"] == 0
    assert any(row["clipped"] for row in log)
    assert all(row["grad_norm"] <= 1.0 for row in log if not row["clipped"])


def test_flax_linen_trainstate_resumes_bitwise(tmp_path: Path) -> None:
    result = load("flax_linen_trainstate.py").main(["--smoke", "--ckpt-dir", str(tmp_path)])
    assert result["round_trip_exact"]
    assert result["identical"] and result["max_abs_diff"] == 0.0
    assert result["step"] == 40
    assert result["spike_clipped"] and result["same_clips"]
    assert int(result["restored_stats"]["step_count"]) == 20
    assert {"grad_norm", "clipped", "nonfinite", "threshold", "mean", "var"} <= set(
        result["final_stats"]
    )
    assert (tmp_path / "step_20").is_dir()


def test_schedule_sets_the_threshold_and_accumulation_clips_the_mean() -> None:
    result = load("schedules_and_accumulation.py").main(["--steps", "8"])
    schedule = result["schedule"]
    expected = np.linspace(0.5, 4.0, 8)
    np.testing.assert_allclose([r["threshold"] for r in schedule], expected, rtol=1e-6)
    for r in schedule:
        assert r["applied_norm"] == pytest.approx(min(r["grad_norm"], r["threshold"]), rel=1e-4)
        assert r["clipped"] == (r["grad_norm"] > r["threshold"])
    assert schedule[0]["clipped"]

    rows = result["accumulation"]
    for r in rows:
        assert r["recorded"] == pytest.approx(r["norm_of_mean"], rel=1e-5)
        assert r["recorded"] != pytest.approx(np.mean(r["micro_norms"]), rel=0.05)
        assert r["clipped"] == (r["norm_of_mean"] > 4.0)
    # Some step had micro-batches above the threshold while their mean was not clipped:
    # clipping each micro-batch would have changed that step, clipping the mean did not.
    assert any(not r["clipped"] and max(r["micro_norms"]) > 4.0 for r in rows)
    assert any(r["clip_then_average"] < r["average_then_clip"] - 0.1 for r in rows)
