"""The tools' first call on a base model: the jitted encoder with its parameters as an
argument (``inference.load_encoder``) against the same encoder closing over them
(their values then become constants of the program), in one process.

    python -m benchmarks.first_call [--rounds 3] [--frames 1024]

Each round builds both jitted functions afresh and times their first call on a new
input shape (trace, compile, run) and a second call (run only). With a persistent
compilation cache (as the tests and many users set one) the closure's constants are
also serialised into the cache: ``--cache`` times that case.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from asda_jax import model as model_lib
from benchmarks import common


def timed(fn, *args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def round_times(encoder, params, spec) -> dict[str, float]:
    as_argument = jax.jit(lambda p, x: encoder.apply({"params": p}, x).tokens)
    closing_over = jax.jit(lambda x: encoder.apply({"params": params}, x).tokens)
    return {
        "argument, first": timed(as_argument, params, spec),
        "argument, second": timed(as_argument, params, spec),
        "closure, first": timed(closing_over, spec),
        "closure, second": timed(closing_over, spec),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--frames", type=int, default=1024)
    parser.add_argument("--cache", action="store_true", help="a persistent compilation cache")
    args = parser.parse_args()
    if args.cache:
        jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="first-call-"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    print(f"machine: {common.machine()}; {common.versions()}; cache: {args.cache}")
    cfg = model_lib.preset("base")
    encoder = model_lib.Encoder(cfg)
    params = nn.meta.unbox(
        jax.jit(encoder.init)(jax.random.key(0), jnp.zeros((1, 16, cfg.num_mel_bins)))
    )["params"]
    runs = []
    for i in range(args.rounds):  # a new batch size each round: a new program to compile
        spec = jnp.asarray(np.zeros((1 + i, args.frames, cfg.num_mel_bins), np.float32))
        runs.append(round_times(encoder, params, spec))
    medians = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    base = medians["argument, first"]
    common.print_table(
        f"Base encoder, {args.frames} frames: first and second call "
        f"(medians of {args.rounds} rounds; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r})",
        ["parameters", "call", "seconds", "ratio to the argument's first call"],
        [[*k.split(", "), f"{v:.2f}", f"{v / base:.2f}"] for k, v in medians.items()],
    )


if __name__ == "__main__":
    main()
