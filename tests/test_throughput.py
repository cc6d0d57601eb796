"""The per-interval speed report: its arithmetic on a clock the test drives."""

import pytest

from asda_jax import throughput


def test_a_lap_reports_the_interval_since_the_last_one(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: now[0])
    made = [throughput.Production(0, 0.0)]
    clock = throughput.StepClock(
        step_flops=8e12, global_batch=32, devices=4, peak_flops=1e12, production=lambda: made[0]
    )
    assert clock.lap(1) == {}  # nothing has arrived: no interval yet
    clock.arrived(1)  # step 1 (and its compilation) stays out
    now[0], made[0] = 102.0, throughput.Production(64, 0.5)
    clock.waited(0.5)
    clock.arrived(3)
    report = clock.lap(3)  # two steps in two seconds
    assert report == pytest.approx({
        "step_seconds": 1.0,
        "clips_per_s": 32.0,
        "clips_per_s_per_device": 8.0,
        "tflops_per_device": 2.0,
        "mfu": 2.0,  # above 1: the peak given here is small; the arithmetic is the point
        "input_wait_share": 0.25,
        "input_clips_per_s": 128.0,
    })  # fmt: skip
    now[0] = 106.0
    later = clock.lap(7)  # the next interval starts where that one ended: 4 s, 4 steps
    assert later["step_seconds"] == 1.0 and later["input_wait_share"] == 0.0
    assert "input_clips_per_s" not in later  # the pipeline made nothing since
    assert clock.lap(7) == {}


def test_no_mfu_where_the_chip_publishes_no_peak():
    clock = throughput.StepClock(1e9, 8, 1, None, production=throughput.Production)
    clock.arrived(1)
    assert "mfu" not in clock.lap(2)
