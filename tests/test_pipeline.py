"""The input pipeline: host shards, exact evaluation coverage, resumable state, devices."""

import concurrent.futures
import dataclasses
import itertools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asda_jax import audio, hardware, sharding
from asda_jax.data import datasets, pipeline
from asda_jax.testing import fixtures as fx


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    datasets.prepare("synthetic", root, clips_per_class=5)  # 40 train, 10 test
    return str(root)


def config(data_dir, **overrides):
    base = dict(
        dataset="synthetic", data_dir=data_dir, batch_size=4, target_frames=128, fbank_on="host",
        threads=2,
    )  # fmt: skip
    return pipeline.InputConfig(**{**base, **overrides})


def take(stream, n):
    return list(itertools.islice(iter(stream), n))


def test_two_hosts_read_disjoint_shards_covering_an_epoch_once(synthetic_dir):
    cfg = config(synthetic_dir)
    per_host = []
    for host in range(2):
        stream = pipeline.make_pipeline(cfg, train=True, process_index=host, process_count=2)
        batches = take(stream, 10)  # 40 records / 2 hosts / 2 rows per host batch
        assert all(b["spectrogram"].shape == (2, 128, 128) for b in batches)
        per_host.append(np.concatenate([b["index"] for b in batches]))
    assert set(per_host[0]).isdisjoint(per_host[1])
    assert sorted(np.concatenate(per_host)) == list(range(40))


def test_hosts_assemble_exactly_the_single_process_batches(synthetic_dir):
    cfg = config(synthetic_dir, random_crop=True, roll_and_gain=True, target_frames=64)
    single = take(pipeline.make_pipeline(cfg, train=True), 3)
    hosts = [
        take(pipeline.make_pipeline(cfg, train=True, process_index=h, process_count=2), 3)
        for h in range(2)
    ]
    for step, expected in enumerate(single):
        for key, value in expected.items():
            assembled = np.concatenate([hosts[0][step][key], hosts[1][step][key]])
            np.testing.assert_array_equal(assembled, value)


def test_evaluation_counts_every_clip_exactly_once_over_hosts(synthetic_dir):
    cfg = config(synthetic_dir, split="test", batch_size=4)  # 10 clips: 3 batches, 2 padded rows
    seen, steps = [], []
    for host in range(2):
        batches = list(
            pipeline.make_pipeline(cfg, train=False, process_index=host, process_count=2)
        )
        steps.append(len(batches))
        for b in batches:
            assert b["spectrogram"].shape[0] == 2
            seen.extend(b["index"][b["valid"]].tolist())
            assert np.all(b["index"][~b["valid"]] == -1)
    assert steps == [3, 3]  # ⌈10 / 4⌉ batches on every host
    assert sorted(seen) == list(range(10))


def test_restored_iterator_replays_an_uninterrupted_run(synthetic_dir):
    cfg = config(synthetic_dir, random_crop=True, roll_and_gain=True, target_frames=64, seed=3)
    uninterrupted = iter(pipeline.make_pipeline(cfg, train=True))
    reference = take(uninterrupted, 12)  # crosses the 10-batch epoch boundary
    first = iter(pipeline.make_pipeline(cfg, train=True))
    take(first, 5)
    state = first.get_state()
    resumed = iter(pipeline.make_pipeline(cfg, train=True))
    resumed.set_state(state)
    for expected, got in zip(reference[5:], take(resumed, 7), strict=True):
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key])


def test_training_epochs_reshuffle_and_augment_deterministically(synthetic_dir):
    cfg = config(synthetic_dir, roll_and_gain=True)
    batches = take(pipeline.make_pipeline(cfg, train=True), 20)
    epoch_1 = np.concatenate([b["index"] for b in batches[:10]])
    epoch_2 = np.concatenate([b["index"] for b in batches[10:]])
    assert sorted(epoch_1) == sorted(epoch_2) == list(range(40))
    assert not np.array_equal(epoch_1, epoch_2)
    other_seed = take(pipeline.make_pipeline(dataclasses.replace(cfg, seed=1), train=True), 1)
    assert not np.array_equal(other_seed[0]["index"], batches[0]["index"])


def test_weighted_epochs_draw_distinct_clips_in_proportion():
    weights = np.array([1.0, 0.0, 3.0, 1.0, 5.0, 2.0])
    draws = pipeline.WeightedEpochs(weights, draws=2, seed=0)
    counts = np.zeros(6)
    for epoch in range(4000):
        picked = [draws[2 * epoch], draws[2 * epoch + 1]]
        assert picked[0] != picked[1]
        counts[picked] += 1
    assert counts[1] == 0
    order = np.argsort(counts[[0, 2, 3, 4, 5]])
    assert list(order) in ([0, 2, 4, 1, 3], [2, 0, 4, 1, 3])  # ranks follow the weights
    assert draws[12345] == pipeline.WeightedEpochs(weights, draws=2, seed=0)[12345]
    with pytest.raises(ValueError, match="not all zero"):
        pipeline.WeightedEpochs(np.zeros(3), draws=1, seed=0)


def test_weighted_epochs_read_by_eight_threads_equal_one_thread():
    """The AS-2M sampler under grain's reader threads, straddling epoch ends."""
    weights = np.random.default_rng(0).random(20_000)
    # Readers a little out of order: each position of an epoch next to the same one of
    # the epoch after, as threads that straddle an epoch's end read them.
    positions = [
        (e + side) * 16 + i for e in range(0, 200, 2) for i in range(16) for side in (0, 1)
    ]
    alone = pipeline.WeightedEpochs(weights, draws=16, seed=1)
    expected = [alone[p] for p in positions]
    shared = pipeline.WeightedEpochs(weights, draws=16, seed=1)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can
    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            got = list(pool.map(shared.__getitem__, positions, chunksize=1))
    finally:
        sys.setswitchinterval(interval)
    assert got == expected


def test_device_fbank_equals_host_fbank(synthetic_dir):
    host = take(pipeline.make_pipeline(config(synthetic_dir, split="test"), train=False), 1)[0]
    device_cfg = config(synthetic_dir, split="test", fbank_on="device", target_frames=160)
    raw = take(pipeline.make_pipeline(device_cfg, train=False), 1)[0]
    spec, frames = jax.jit(audio.device_spectrogram, static_argnums=2, static_argnames="forms")(
        raw["waveform"], raw["num_samples"], device_cfg.norm, forms=hardware.CPU_FORMS
    )
    assert spec.shape == (4, 160, 128)
    np.testing.assert_array_equal(frames, host["frames"])  # 128 real frames of 1.3 s clips
    np.testing.assert_allclose(spec[:, :128], host["spectrogram"], atol=1e-3)
    np.testing.assert_allclose(spec[:, 128:], 0.4671, atol=1e-4)  # padding, normalised


def test_undecodable_records_are_skipped_in_training_and_invalid_in_evaluation(tmp_path):
    fx.class_folders_tree(tmp_path / "src")
    fx.CorruptFolder(
        data_dir=str(tmp_path / "data"), source_dir=tmp_path / "src"
    ).download_and_prepare(file_format="array_record")
    cfg = pipeline.InputConfig(
        dataset="corrupt_folder", data_dir=str(tmp_path / "data"), batch_size=1,
        target_frames=48, fbank_on="host",
    )  # fmt: skip
    stats = pipeline.ReadStats()
    batches = take(pipeline.make_pipeline(cfg, train=True, stats=stats), 10)
    assert len({int(b["index"][0]) for b in batches}) == 5  # 6 clips, one never arrives
    assert stats.skipped["unreadable"] >= 1
    stats = pipeline.ReadStats()
    evaluation = list(pipeline.make_pipeline(cfg, train=False, stats=stats))
    assert len(evaluation) == 6 and sum(bool(b["valid"][0]) for b in evaluation) == 5
    assert stats.skipped == {"unreadable": 1}  # the split's one bad clip, counted once


def test_batches_become_global_arrays_and_prefetch_keeps_the_consumed_state(synthetic_dir):
    mesh = sharding.make_mesh(sharding.DATA_PARALLEL)
    cfg = config(synthetic_dir, batch_size=8)
    stream = iter(pipeline.make_pipeline(cfg, train=True))
    prefetch = pipeline.DevicePrefetch(stream, mesh, size=3)
    first = [next(prefetch) for _ in range(2)]
    state = prefetch.get_state()
    following = next(prefetch)
    prefetch.close()
    assert first[0]["spectrogram"].shape == (8, 128, 128)
    assert len(first[0]["spectrogram"].sharding.device_set) == 8
    resumed = iter(pipeline.make_pipeline(cfg, train=True))
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["index"], np.asarray(following["index"]))
    assert jnp.sum(first[0]["labels"]) == 8


def test_input_config_is_validated():
    with pytest.raises(ValueError, match="does not divide over 3 hosts"):
        pipeline.InputConfig(batch_size=8, fbank_on="host").validate(process_count=3)
    with pytest.raises(ValueError, match="fbank_on"):
        pipeline.InputConfig(fbank_on="gpu").validate()
    with pytest.raises(ValueError, match="fbank_on must be 'host' or 'device', got 'auto'"):
        pipeline.InputConfig().validate()  # "auto" is for config_lib to resolve first
