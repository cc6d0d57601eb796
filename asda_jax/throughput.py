"""What a training run reports of its speed, per logging interval.

The loop tells a ``StepClock`` how long each ``next`` on the input waited and when each
step's metrics arrived from the devices. Metrics arrive when the devices finish their
step, and the loop stays a step ahead of them, so the time between two arrivals over
the steps between is the devices' step time (the input's stalls included: a step that
waited for its batch finishes late). Per interval, from the step's model FLOPs
(``flop_counts``, through the task) and the chip's row in ``hardware``:

    step_seconds         wall time per step
    clips_per_s          global batch / step_seconds; clips_per_s_per_device
    tflops_per_device    model FLOPs per step / step_seconds / devices / 1e12
    mfu                  tflops_per_device against the chip's published peak (known chips)
    input_wait_share     the share of the interval the loop waited for a batch
    input_clips_per_s    this host's pipeline: clips it made / the time it spent making them
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable


@dataclasses.dataclass(frozen=True)
class Production:
    """What an input pipeline has made so far on this host."""

    clips: int = 0
    seconds: float = 0.0  # spent making them (not waiting for room to hand them over)


@dataclasses.dataclass
class StepClock:
    step_flops: float  # model FLOPs of one step, all devices
    global_batch: int
    devices: int
    peak_flops: float | None  # per device; None where the chip's is not published
    production: Callable[[], Production]
    _mark: tuple[int, float, Production] | None = None  # (step, arrival, input then)
    _waited: float = 0.0  # waiting for input since the mark

    def waited(self, seconds: float) -> None:
        self._waited += seconds

    def arrived(self, step: int) -> None:
        """``step``'s metrics are on the host; the first arrival starts the clock (the
        first step's compilation stays out of every interval)."""
        if self._mark is None:
            self._mark = (step, time.perf_counter(), self.production())
            self._waited = 0.0

    def lap(self, step: int) -> dict[str, float]:
        """The interval since the last lap (or the first arrival) up to ``step``, whose
        metrics have just arrived; empty when no step has passed since."""
        if self._mark is None or step <= self._mark[0]:
            return {}
        start_step, start, made_before = self._mark
        now, made = time.perf_counter(), self.production()
        wall = now - start
        step_seconds = wall / (step - start_step)
        clips_per_s = self.global_batch / step_seconds
        tflops = self.step_flops / step_seconds / self.devices / 1e12
        report = {
            "step_seconds": step_seconds,
            "clips_per_s": clips_per_s,
            "clips_per_s_per_device": clips_per_s / self.devices,
            "tflops_per_device": tflops,
            "input_wait_share": min(self._waited / wall, 1.0),
        }
        if self.peak_flops:
            report["mfu"] = tflops * 1e12 / self.peak_flops
        making = made.seconds - made_before.seconds
        if making > 0:
            report["input_clips_per_s"] = (made.clips - made_before.clips) / making
        self._mark, self._waited = (step, now, made), 0.0
        return report
