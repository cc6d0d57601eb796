"""Checkpoint save and restore of the base model's pretraining state: local disk against
a Cloud Storage bucket, in one process.

    python -m benchmarks.checkpoint_storage [--rounds 3]

The state is configs/pretrain_as2m.py's (base model: student, teacher, decoder, Adam's
moments, step) on this host's CPU devices, created as a run creates it. Each round
saves it once into a fresh folder of the local disk and once into a fresh folder of a
GCS-API server on 127.0.0.1 (asda_jax/testing/gcs_server.py, objects in memory), alternating, then
restores each onto the same shardings; the tables show the medians, and the bucket's
time as a ratio of the disk's. The bucket on loopback measures the clients' work (gcsfs,
tensorstore, Orbax's commit protocol for object stores), not a network.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import jax

from asda_jax import checkpoints, config_lib, hardware, sharding, storage, train_lib, train_state
from asda_jax.testing import gcs_server
from benchmarks import common


def base_pretraining_state():
    config = config_lib.load_file("configs/pretrain_as2m.py", "mesh=cpu")
    config.data.batch_size = jax.device_count()
    task = train_lib.make_task(config_lib.read(config, hardware.HOST))
    mesh = sharding.make_mesh(dict(sharding.DATA_PARALLEL))
    plan = train_state.plan_state(task, mesh, jax.random.PRNGKey(0))
    return train_state.create_state(plan, mesh, jax.random.PRNGKey(0)), plan


def save_seconds(workdir: str, state) -> float:
    start = time.perf_counter()
    saver = checkpoints.Checkpoints(workdir, async_save=False)
    saver.save(1, state, {"position": 0})
    saver.close()
    return time.perf_counter() - start


def restore_seconds(workdir: str, target) -> float:
    start = time.perf_counter()
    reader = checkpoints.Checkpoints(workdir, async_save=False)
    state, _ = reader.restore(1, target)
    jax.block_until_ready(state)
    reader.close()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    storage.configure()  # gcsfs, which the loopback server can serve
    state, plan = base_pretraining_state()
    size = sum(x.nbytes for x in jax.tree.leaves(state))
    times: dict[tuple[str, str], list[float]] = {}
    with gcs_server.serving() as bucket, tempfile.TemporaryDirectory() as local:
        places = {"local disk": local, "GCS on loopback": f"{bucket}/bench"}
        for round_ in range(args.rounds):
            for name, root in places.items():
                workdir = f"{root}/round{round_}"
                times.setdefault((name, "save"), []).append(save_seconds(workdir, state))
                restored = restore_seconds(workdir, plan.restore_target())
                times.setdefault((name, "restore"), []).append(restored)
            storage.path(f"{bucket}/bench/round{round_}").rmtree()  # the server holds RAM
    print(common.machine())
    print(
        f"state: {len(jax.tree.leaves(state))} arrays, {size / 2**20:.0f} MiB; {args.rounds} rounds"
    )
    rows = []
    for what in ("save", "restore"):
        disk = statistics.median(times[("local disk", what)])
        for name in ("local disk", "GCS on loopback"):
            median = statistics.median(times[(name, what)])
            rows.append(
                (
                    what,
                    name,
                    f"{median:.2f}",
                    f"{size / 2**20 / median:.0f}",
                    f"{median / disk:.2f}",
                )
            )
    common.print_table(
        "Checkpoint of the base pretraining state",
        ("", "where", "median s", "MiB/s", "× local disk"),
        rows,
    )


if __name__ == "__main__":
    main()
