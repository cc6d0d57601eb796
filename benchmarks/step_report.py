"""The training loop's per-interval speed report on the demo run, and what it costs.

    python -m benchmarks.step_report [--steps 60] [--rounds 2]

Runs configs/demo.py's pretraining (the synthetic dataset, prepared if missing) for
--steps steps, logging every 10, in alternating rounds: the loop as it is, and the loop
with the ``StepClock``'s calls made no-ops. In both, the time each step's metrics reach
the host is recorded by the same wrapper, so the median step time of the two variants
is compared in one process. Also printed: the report's own fields (medians over the
run's intervals) and the clock's per-step work timed alone.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

from asda_jax import config_lib, throughput, train_lib
from asda_jax.data import datasets
from benchmarks import common

DATA = Path("data")  # the demo's default data_dir
FIELDS = (
    "step_seconds",
    "clips_per_s",
    "tflops_per_device",
    "input_wait_share",
    "input_clips_per_s",
)


def run_once(steps: int, with_clock: bool, arrivals: list[float]) -> list[dict]:
    """One demo run; the lines of its metrics.jsonl that carry the report."""
    config = config_lib.load_file("configs/demo.py")
    config.update_from_flattened_dict(
        {
            "num_train_steps": steps,
            "optim.warmup_steps": min(30, steps),
            "log_every": 10,
            "checkpoint_every": 10_000,
            "probe": None,
        },
    )
    config.data.data_dir = str(DATA)
    originals = {name: getattr(throughput.StepClock, name) for name in ("waited", "arrived")}
    lap = throughput.StepClock.lap
    if not with_clock:
        for name in originals:
            setattr(throughput.StepClock, name, lambda self, _: None)
        throughput.StepClock.lap = lambda self, _: {}
    report = train_lib._Run.report

    def timed_report(self, step, metrics):
        report(self, step, metrics)
        arrivals.append(time.perf_counter())

    train_lib._Run.report = timed_report
    try:
        with tempfile.TemporaryDirectory() as workdir:
            train_lib.train(config, workdir)
            lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    finally:
        train_lib._Run.report = report
        for name, method in originals.items():
            setattr(throughput.StepClock, name, method)
        throughput.StepClock.lap = lap
    return [x for x in map(json.loads, lines) if "step_seconds" in x]


def step_seconds(arrivals: list[float]) -> float:
    """Median time between consecutive steps' metrics arriving, the first two left out
    (compilation and the first dispatch)."""
    gaps = [b - a for a, b in itertools.pairwise(arrivals[2:])]
    return statistics.median(gaps)


def clock_work_seconds(repeats: int = 200_000) -> float:
    """One step's worth of the clock's calls: two perf_counter reads, waited, arrived."""
    clock = throughput.StepClock(1.0, 1, 1, None, production=throughput.Production)
    clock.arrived(0)
    start = time.perf_counter()
    for step in range(repeats):
        waiting = time.perf_counter()
        clock.waited(time.perf_counter() - waiting)
        clock.arrived(step)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    datasets.prepare("synthetic", DATA)  # reused where already prepared
    print(f"machine: {common.machine()}\nversions: {common.versions()}")

    times: dict[bool, list[float]] = {True: [], False: []}
    reports: list[dict] = []
    run_once(12, True, [])  # warm the compilation cache and the dataset's files
    for _ in range(args.rounds):
        for with_clock in (True, False):
            arrivals: list[float] = []
            lines = run_once(args.steps, with_clock, arrivals)
            times[with_clock].append(step_seconds(arrivals))
            reports += lines if with_clock else []
    common.print_table(
        f"The demo run's report (medians over {len(reports)} intervals of 10 steps)",
        ["field", "median"],
        [(f, f"{statistics.median(x[f] for x in reports if f in x):.4g}") for f in FIELDS],
    )
    with_clock, without = (statistics.median(times[k]) for k in (True, False))
    work = clock_work_seconds()
    rounds = lambda k: ", ".join(f"{t * 1e3:.1f}" for t in times[k])
    common.print_table(
        f"Step time with and without the report ({args.rounds} alternating rounds of "
        f"{args.steps} steps)",
        ["loop", "median step (ms)", "each round's median (ms)", "ratio"],
        [
            ("without the clock (no-op calls)", f"{without * 1e3:.2f}", rounds(False), "1.000"),
            (
                "with the clock",
                f"{with_clock * 1e3:.2f}",
                rounds(True),
                f"{with_clock / without:.3f}",
            ),
            ("the clock's work per step, alone", f"{work * 1e3:.5f}", "", f"{work / without:.2e}"),
        ],
    )


if __name__ == "__main__":
    main()
