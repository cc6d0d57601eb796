"""Every builder from a fixture tree in its real layout: labels, folds, splits, bad files."""

import collections

import numpy as np
import pytest

from asda_jax import audio
from asda_jax.data import builders, datasets
from asda_jax.testing import fixtures as fx


def records(dataset, split):
    source = dataset.source(split)
    return [source[i] for i in range(len(source))]


def by_id(dataset, split):
    return {r["id"].decode(): r for r in records(dataset, split)}


def dominant_frequency(record) -> float:
    wave = audio.read_audio(record["audio"])
    return float(np.argmax(np.abs(np.fft.rfft(wave))) * audio.SAMPLE_RATE / wave.size)


def test_esc50_builds_five_folds_with_targets(tmp_path):
    targets = fx.esc50_tree(tmp_path / "ESC-50-master")
    ds = datasets.prepare("esc50", tmp_path / "data", source_dir=tmp_path / "ESC-50-master")
    assert ds.split_sizes == {f"fold{k}": 2 for k in range(1, 6)}
    assert ds.class_names == ["dog", "rain", "clock_tick"]
    for fold in range(1, 6):
        for clip_id, record in by_id(ds, f"fold{fold}").items():
            assert clip_id.startswith(f"{fold}-")
            assert record["label_ids"].tolist() == [targets[clip_id]]
            assert record["num_samples"] == 8000  # 0.5 s at 44.1 kHz → 16 kHz
            assert abs(dominant_frequency(record) - (300 + 100 * targets[clip_id])) < 5
    assert len(ds.source("fold1+fold2+fold3+fold4")) == 8


def test_speech_commands_uses_the_official_lists_and_35_word_labels(tmp_path):
    fx.speech_commands_tree(tmp_path / "sc")
    ds = datasets.prepare("speech_commands_v2", tmp_path / "data", source_dir=tmp_path / "sc")
    assert ds.split_sizes == {"train": 3, "validation": 3, "test": 3}
    assert ds.num_classes == 35
    assert set(by_id(ds, "validation")) == {
        f"{w}/speaker0_nohash_0.wav" for w in ("yes", "no", "up")
    }
    assert set(by_id(ds, "test")) == {f"{w}/speaker1_nohash_0.wav" for w in ("yes", "no", "up")}
    for clip_id, record in by_id(ds, "train").items():
        word = clip_id.split("/")[0]
        assert ds.class_names[record["label_ids"][0]] == word  # background noise is not a word


def test_audioset_from_segment_csvs(tmp_path):
    clips = fx.audioset_segments_tree(tmp_path / "as")
    ds = datasets.prepare("audioset", tmp_path / "data", source_dir=tmp_path / "as")
    assert ds.class_names == ["Speech", "Music", "Animal"]
    assert ds.split_sizes == {"balanced_train": 3, "eval": 2}
    assert ds.skipped["balanced_train"] == {"missing": 1}
    for split, expected in clips.items():
        got = by_id(ds, split)
        for ytid, record in got.items():
            assert tuple(record["label_ids"]) == expected[ytid]
    weights = ds.sample_weights("balanced_train")
    counts = collections.Counter(
        label for labels in clips["balanced_train"].values() for label in labels
    )
    expected_weights = [
        sum(1000 / (counts[j] + 0.01) for j in record["label_ids"])
        for record in records(ds, "balanced_train")
    ]
    np.testing.assert_allclose(weights, expected_weights, rtol=1e-6)
    assert ds.sample_weights("eval") is None


def test_audioset_from_release_manifests(tmp_path):
    expected = fx.audioset_manifest_tree(tmp_path / "manifest")
    ds = datasets.prepare("audioset", tmp_path / "data", source_dir=tmp_path / "manifest")
    assert ds.split_sizes == {"train": 2}  # the entry under 10 000 samples is skipped
    got = by_id(ds, "train")
    assert {k: tuple(v["label_ids"]) for k, v in got.items()} == dict(expected)
    assert ds.sample_weights("train").shape == (2,)


def test_audio_folder_from_class_folders_with_splits(tmp_path):
    fx.class_folders_tree(tmp_path / "mine", splits=True)
    ds = datasets.prepare("audio_folder", tmp_path / "data", source_dir=tmp_path / "mine")
    assert ds.class_names == ["bird", "car"]
    assert ds.split_sizes == {"train": 4, "test": 2}
    for record in records(ds, "train"):
        name = record["id"].decode().split("/")[1]
        assert ds.class_names[record["label_ids"][0]] == name


def test_audio_folder_from_a_multi_label_csv(tmp_path):
    rows = fx.labels_csv_tree(tmp_path / "csv")
    ds = datasets.prepare("audio_folder", tmp_path / "data", source_dir=tmp_path / "csv")
    assert ds.class_names == ["x", "y", "z"]
    assert ds.split_sizes == {"train": 2, "test": 1}
    for split in ("train", "test"):
        for clip_id, record in by_id(ds, split).items():
            assert {ds.class_names[i] for i in record["label_ids"]} == rows[clip_id]


def test_synthetic_dataset_is_deterministic(tmp_path):
    a = datasets.prepare("synthetic", tmp_path / "a", clips_per_class=4)
    b = datasets.prepare("synthetic", tmp_path / "b", clips_per_class=4)
    assert a.split_sizes == {"train": 30, "test": 10} and a.num_classes == 10
    ra, rb = records(a, "train"), records(b, "train")
    assert [r["audio"] for r in ra] == [r["audio"] for r in rb]
    labels = collections.Counter(int(r["label_ids"][0]) for r in ra)
    assert labels == dict.fromkeys(range(10), 3)


def test_bad_files_are_skipped_and_counted_and_good_ones_all_arrive(tmp_path):
    expected = fx.bad_files_tree(tmp_path / "bad")
    ds = datasets.prepare("audio_folder", tmp_path / "data", source_dir=tmp_path / "bad")
    arrived = {r["id"].decode().split("/")[-1]: r for r in records(ds, "train")}
    good = {name for name, status in expected.items() if status == "good"}
    assert set(arrived) == good
    reasons = collections.Counter(status for status in expected.values() if status != "good")
    assert ds.skipped["train"] == dict(reasons)
    long = arrived["very_long.flac"]
    assert long["num_samples"] == int(builders.AudioFolder.MAX_SECONDS * audio.SAMPLE_RATE)
    assert arrived["wrong_rate.wav"]["num_samples"] == 8000
    assert arrived["stereo.wav"]["num_samples"] == 8000


def test_processes_convert_large_sources_of_files_on_hosts_of_more_than_two_cores(tmp_path):
    def uses_processes(builder, workers, clips):
        made = builder(data_dir=str(tmp_path), source_dir=tmp_path, workers=workers)
        return made._uses_processes(clips)

    large = builders.PROCESS_POOL_MIN_CLIPS
    assert uses_processes(builders.AudioFolder, 3, large)
    assert not uses_processes(builders.AudioFolder, 3, large - 1)
    assert not uses_processes(builders.AudioFolder, 2, large)  # two cores: threads as fast
    assert not uses_processes(builders.Synthetic, 96, 10 * large)  # computed, not decoded


@pytest.mark.subprocess
def test_worker_processes_prepare_what_threads_prepare_bad_files_included(tmp_path):
    fx.bad_files_tree(tmp_path / "bad")
    fx.class_folders_tree(tmp_path / "bad" / "more", per_class=4)
    prepared = {
        pool: datasets.prepare(
            "audio_folder", tmp_path / pool, source_dir=tmp_path / "bad", workers=2, pool=pool
        )
        for pool in ("threads", "processes")
    }
    threads, processes = (
        records(prepared["threads"], "train"),
        records(prepared["processes"], "train"),
    )
    assert len(processes) == len(threads) > 8
    for a, b in zip(threads, processes, strict=True):
        assert a["id"] == b["id"] and a["audio"] == b["audio"]
        np.testing.assert_array_equal(a["label_ids"], b["label_ids"])
    assert prepared["processes"].skipped == prepared["threads"].skipped != {"train": {}}
    with pytest.raises(ValueError, match="pool must be one of"):
        datasets.prepare("audio_folder", tmp_path / "x", source_dir=tmp_path / "bad", pool="fork")


def test_missing_or_mislaid_sources_fail_at_once_naming_the_layout(tmp_path):
    with pytest.raises(builders.DatasetLayoutError, match=r"does not exist[\s\S]*meta/esc50.csv"):
        datasets.prepare("esc50", tmp_path / "data", source_dir=tmp_path / "nowhere")
    (tmp_path / "wrong" / "audio").mkdir(parents=True)
    with pytest.raises(builders.DatasetLayoutError, match=r"missing .*esc50.csv[\s\S]*Expected"):
        datasets.prepare("esc50", tmp_path / "data", source_dir=tmp_path / "wrong")
    with pytest.raises(builders.DatasetLayoutError, match=r"class_labels_indices\.csv"):
        datasets.prepare("audioset", tmp_path / "data", source_dir=tmp_path / "wrong")
    with pytest.raises(datasets.DatasetNotFoundError, match=r"prepare_data\.py --dataset=esc50"):
        datasets.load("esc50", tmp_path / "empty")
    with pytest.raises(ValueError, match="unknown dataset"):
        datasets.prepare("librispeech", tmp_path / "data")
