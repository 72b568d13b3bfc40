"""examples/monitoring.py, in a small setting: TensorBoard events, the CSV and the figure.

The event file is read back record by record (TFRecord framing, tensorboardX's `Event`
protobuf), so the test sees what TensorBoard would.
"""

import csv
import math
import struct
from pathlib import Path
from typing import Any

from _examples import load
from tensorboardX.proto import event_pb2

LAYERS = 2
STEPS = 6


def read_scalars(path: Path) -> dict[str, dict[int, float]]:
    """Every scalar in an event file: tag -> step -> value."""
    data, at, out = path.read_bytes(), 0, {}
    while at < len(data):
        (length,) = struct.unpack("<Q", data[at : at + 8])
        event = event_pb2.Event.FromString(data[at + 12 : at + 12 + length])
        at += 12 + length + 4  # length, its CRC, the record, its CRC
        for value in event.summary.value:
            out.setdefault(value.tag, {})[event.step] = value.simple_value
    return out


def test_monitoring_logs_events_csv_and_draws_the_figure(tmp_path: Path) -> None:
    png = tmp_path / "monitoring.png"
    argv = ["--steps", str(STEPS), "--layers", str(LAYERS), "--d-model", "16", "--heads", "2"]
    argv += ["--seq", "16", "--batch-size", "4", "--logdir", str(tmp_path / "run")]
    result: dict[str, Any] = load("monitoring.py").main([*argv, "--out", str(png)])
    rows = result["rows"]
    assert len(rows) == STEPS
    for row in rows:
        # The monitor before the clip sees the norm the clip measures (combined from its
        # groups' norms, so equal up to rounding).
        assert math.isclose(row["grads/grad_norm"], row["clip/grad_norm"], rel_tol=1e-6)
        per_layer = [row[f"grads/norms/blocks/{i}"] for i in range(LAYERS)]
        assert all(n > 0 for n in per_layer)
        groups = [v for k, v in row.items() if k.startswith("grads/norms/")]
        assert len(groups) == LAYERS + 4  # embed, position, final_norm, head
        assert math.isclose(row["grads/grad_norm"], math.hypot(*groups), rel_tol=1e-5)
        assert not row["grads/clipped"] and not row["updates/clipped"]
        assert 0 < row["clip/scale"] <= 1
        assert row["updates/ratio/['blocks']['up']['kernel']"] > 0

    events = list((tmp_path / "run").glob("events.out.tfevents.*"))
    assert len(events) == 1
    scalars = read_scalars(events[0])
    for tag in ("grads/norms/blocks/0", "grads/norms/blocks/1", "clip/scale", "loss"):
        assert sorted(scalars[tag]) == list(range(STEPS)), tag
    assert "updates/norms/blocks.up.kernel" in scalars
    for step, row in enumerate(rows):
        value = scalars["grads/norms/blocks/1"][step]
        assert math.isclose(value, row["grads/norms/blocks/1"], rel_tol=1e-6)

    with result["csv"].open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == STEPS
    assert {"step", "loss", "grads/norms/blocks/0", "updates/ratio/blocks.up.kernel"} <= set(
        table[0]
    )
    assert float(table[-1]["clip/grad_norm"]) == rows[-1]["clip/grad_norm"]

    header = png.read_bytes()[:8]
    assert header == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
