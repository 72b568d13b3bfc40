"""Every example runs in the test suite, in a small setting, and shows what it claims."""

from pathlib import Path

from _examples import load


def test_quickstart_clips_the_spike_and_reports_it() -> None:
    log = load("quickstart.py").main(["--steps", "10", "--max-norm", "1.0"])
    assert len(log) == 10
    spike = log[9]
    assert spike["clipped"] and spike["grad_norm"] > 50
    assert all(row["nonfinite"] == 0 for row in log)
    assert log[5]["loss"] < log[0]["loss"]


def test_spike_robustness_separates_fixed_from_scale_free(tmp_path: Path) -> None:
    png = tmp_path / "spikes.png"
    only = ["--only", "optax clip 1.0", "zclip", "guard z=4"]
    rows = load("spike_robustness.py").main(
        ["--steps", "1000", "--seeds", "1", "--out", str(png), *only]
    )
    fixed_small, fixed_one, _ = rows["optax clip 1.0"]["final"]
    assert fixed_small > 10 * fixed_one
    for name in ("zclip", "guard z=4"):
        losses = rows[name]["final"]
        assert max(losses) < 2 * min(losses)
        assert losses[0] < fixed_small / 10
    # After the level shift (x10 for good, at step 666) guard applies steps again.
    assert rows["guard z=4"]["applied_after_shift"] >= 0.95
    assert rows["optax clip 1.0"]["applied_after_shift"] is None
    assert png.stat().st_size > 10_000


def test_demo_smoke(tmp_path: Path) -> None:
    png = tmp_path / "demo.png"
    rows = load("demo.py").main(["--smoke", "--devices", "4", "--out", str(png)])
    assert not rows["no clipping"]["survived"]
    assert not rows["optax clip_by_global_norm"]["survived"]
    for name in ("optaxclip clip_by_global_norm", "optaxclip zclip", "optaxclip guard"):
        assert rows[name]["survived"]
        assert rows[name]["skipped"] >= 1
    assert rows["optaxclip zclip"]["clipped"] >= 1
    assert rows["no clipping"]["clipped"] is None
    # After the level shift (x10 for good) guard applies steps again.
    assert rows["optaxclip guard"]["applied_after_shift"] >= 0.9
    assert rows["no clipping"]["applied_after_shift"] is None
    assert png.stat().st_size > 10_000
