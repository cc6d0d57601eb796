"""Progress of long loops over files and clips, for a person watching or a log.

On a terminal (stderr a TTY) a tqdm bar: counts, rate and time left, redrawn in place.
Elsewhere (CI, nohup, a scheduler's log file) a bar's carriage returns would pile up
into one unreadable line, so the same figures come as a plain line at most every
``every_s`` seconds, and once at the end.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

import tqdm

T = TypeVar("T")
PLAIN_EVERY_S = 30.0
# the plain line: "extract: 120/2000 files [01:02<16:10, 1.94 files/s]"
PLAIN_FORMAT = "{desc}: {n_fmt}/{total_fmt}{unit} [{elapsed}<{remaining}, {rate_fmt}]"


def progress(
    items: Iterable[T],
    what: str,
    *,
    total: int | None = None,
    unit: str = "files",
    stream: TextIO | None = None,
    every_s: float = PLAIN_EVERY_S,
) -> Iterator[T]:
    """``items`` as they come, their progress shown on ``stream`` (stderr): ``what`` is
    the work ("extract"), ``unit`` what is counted; ``total`` defaults to ``len(items)``
    where it has one."""
    stream = sys.stderr if stream is None else stream
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    if stream.isatty():
        yield from tqdm.tqdm(items, desc=what, total=total, unit=f" {unit}", file=stream,
                             dynamic_ncols=True)  # fmt: skip
        return
    yield from _plain_lines(items, what, total, unit, stream, every_s)


def _plain_lines(items, what, total, unit, stream, every_s) -> Iterator:
    start = last = time.monotonic()
    done = shown = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= every_s:
            print(plain_line(what, done, total, unit, now - start), file=stream, flush=True)
            last, shown = now, done
    if done != shown or done == 0:
        line = plain_line(what, done, total, unit, time.monotonic() - start)
        print(line, file=stream, flush=True)


def plain_line(what: str, done: int, total: int | None, unit: str, elapsed: float) -> str:
    """One line of progress: count of total, time spent and left, rate."""
    return tqdm.tqdm.format_meter(
        done, total, elapsed, prefix=what, unit=f" {unit}", bar_format=PLAIN_FORMAT
    )


def write(line: str, stream: TextIO | None = None) -> None:
    """Prints ``line`` (to stdout) above a bar being drawn, without breaking it."""
    stream = sys.stdout if stream is None else stream
    tqdm.tqdm.write(line, file=stream)
    stream.flush()
