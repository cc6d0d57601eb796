"""Audio of any length: windows, windowed embeddings, the HEAR API, timelines, and
pretraining on a folder of unlabelled recordings."""

from __future__ import annotations

import collections
import json
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import librosa
import numpy as np
import pytest
import soundfile as sf
import torch

from asda_jax import (
    audio,
    checkpoints,
    cli,
    config_lib,
    embeddings,
    hear,
    inference,
    train_lib,
    windows,
)
from asda_jax import model as model_lib
from asda_jax.data import datasets, pipeline, synthetic
from asda_jax.testing import fixtures as fx
from asda_jax.testing import memory
from tests import train_helpers as th

NORM = audio.NORM_STATS["audioset"]
OPTS = audio.RELEASE_FBANK


def noise(seconds: float, seed: int = 0, level: float = 0.1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (level * rng.standard_normal(int(seconds * audio.SAMPLE_RATE))).astype(np.float32)


@pytest.fixture(scope="module")
def embedder(encoder_export):
    return embeddings.Embedder(inference.load_encoder(encoder_export), batch_size=4)


# ---------------------------------------------------------------------------- windows


def test_windows_cover_the_recording_and_equal_its_whole_fbank(tmp_path):
    wave = noise(7.3)
    windowing = windows.Windowing(frames=128, hop=96)
    cut = list(windows.windows_of_array(wave, windowing, NORM))
    whole = audio.normalize(audio.fbank(wave - wave.mean()), *NORM)  # (F, M)
    assert len(cut) == windowing.count(wave.size)
    for w in cut:
        first = w.index * windowing.hop
        assert w.start == pytest.approx(first * OPTS.window_shift / audio.SAMPLE_RATE)
        real = whole[first : first + windowing.frames]
        assert w.num_frames == real.shape[0]
        np.testing.assert_allclose(w.spectrogram[: w.num_frames], real, atol=1e-4)
    last = cut[-1]
    assert last.end == pytest.approx(wave.size / audio.SAMPLE_RATE)
    assert last.index * windowing.hop + last.num_frames == whole.shape[0]  # every frame
    np.testing.assert_allclose(last.spectrogram[last.num_frames :], audio.normalize(0.0, *NORM))
    # A file read in 1 s blocks gives the same windows as the array.
    path = tmp_path / "noise.wav"
    sf.write(path, wave, audio.SAMPLE_RATE, subtype="FLOAT")
    from_file = list(windows.windows_of_file(path, windowing, NORM, block_seconds=1.0))
    assert [w[:3] for w in from_file] == [w[:3] for w in cut]
    for a, b in zip(from_file, cut, strict=True):
        np.testing.assert_allclose(a.spectrogram, b.spectrogram, atol=1e-4)
    # One window for a recording shorter than a window: its whole length.
    (short,) = windows.windows_of_array(wave[:5000], windowing, NORM)
    assert short.num_frames == OPTS.num_frames(5000) and short.end == 5000 / audio.SAMPLE_RATE
    with pytest.raises(ValueError, match="hop"):
        windows.Windowing(frames=128, hop=129)
    with pytest.raises(audio.AudioError, match="shorter than one"):
        list(windows.windows_of_array(wave[:300], windowing, NORM))


def test_streamed_resampling_equals_resampling_the_whole_file(tmp_path):
    rate = 44_100
    t = np.arange(int(3.5 * rate)) / rate
    tone = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.sin(2 * np.pi * 3000 * t)
    path = tmp_path / "tone.flac"
    sf.write(path, np.stack([tone, tone], axis=1), rate)  # stereo, 44.1 kHz
    streamed = np.concatenate(list(audio.read_blocks(path, block_seconds=0.3)))
    whole = audio.read_audio(path)  # resampled at once, mean removed
    assert abs(streamed.size - whole.size) <= 1
    n = min(streamed.size, whole.size)
    np.testing.assert_allclose(streamed[:n] - streamed[:n].mean(), whole[:n], atol=2e-3)
    with pytest.raises(audio.AudioError, match="no such file"):
        next(audio.read_blocks(tmp_path / "missing.wav"))
    (tmp_path / "bad.wav").write_text("not audio")
    with pytest.raises(audio.AudioError) as e:
        next(audio.read_blocks(tmp_path / "bad.wav"))
    assert e.value.reason == "unreadable"


# ---------------------------------------------------------------------------- embeddings


def whole_clip_tokens(loaded, wave: np.ndarray) -> np.ndarray:  # (1 + N, D)
    """The reference: the clip at its own length, rounded up to whole patches (padded
    with the normalised silence), encoded without a mask."""
    wave = audio.check_waveform(wave)
    frames = -(-OPTS.num_frames(wave.size) // 16) * 16
    spec, _ = audio.spectrogram(wave, frames, NORM)
    return np.asarray(loaded.encode(jnp.asarray(spec)[None]))[0]


def test_windowed_embeddings_of_a_short_clip_equal_the_whole_clip(embedder):
    wave = noise(0.93, seed=1)
    expected = whole_clip_tokens(embedder.encoder, wave)
    out = embeddings.assemble(embedder, embedder.of_array(wave), "concat")
    np.testing.assert_allclose(out.utterance, expected[0], atol=1e-5)
    np.testing.assert_allclose(out.windows, expected[:1], atol=1e-5)
    np.testing.assert_allclose(out.steps.reshape(-1, embedder.dim), expected[1:], atol=1e-5)
    np.testing.assert_allclose(np.diff(out.times_ms), 160.0)
    assert out.times_ms[0] == pytest.approx(87.5)  # frames 0..15: 0 ms to 175 ms


def test_a_batch_of_different_lengths_equals_each_clip_alone(embedder):
    clips = [noise(s, seed=i) for i, s in enumerate((0.2, 1.27, 4.0, 0.05, 2.6))]
    together = embeddings.embed_clips(embedder, clips)
    for i, clip in enumerate(clips):
        alone = embeddings.embed_clips(embedder, [clip])
        n = alone.num_steps[0]
        assert together.num_steps[i] == n == -(-OPTS.num_frames(clip.size) // 16)
        np.testing.assert_allclose(together.scene[i], alone.scene[0], atol=1e-5)
        np.testing.assert_allclose(together.steps[i, :n], alone.steps[0, :n], atol=1e-5)
        assert not together.steps[i, n:].any()
    # A long clip's scene embedding is its windows' CLS outputs weighted by their frames.
    long = embeddings.assemble(embedder, embedder.of_array(clips[2]), "mean")
    weights = np.asarray([OPTS.num_frames(clips[2].size) - 128 * k for k in range(4)])
    weights = np.minimum(weights, 128)
    expected = (long.windows * weights[:, None]).sum(0) / weights.sum()
    np.testing.assert_allclose(together.scene[2], expected, atol=1e-5)
    # Another sample rate is resampled first.
    tone = np.sin(2 * np.pi * 440 * np.arange(40_000) / audio.SAMPLE_RATE).astype(np.float32)
    at_22k = librosa.resample(tone, orig_sr=audio.SAMPLE_RATE, target_sr=22_050)
    resampled = embeddings.embed_clips(embedder, [at_22k], 22_050)
    native = embeddings.embed_clips(embedder, [tone], audio.SAMPLE_RATE)
    assert resampled.num_steps[0] == native.num_steps[0]
    np.testing.assert_allclose(resampled.scene, native.scene, atol=0.02)


def test_overlapping_windows_average_the_steps_they_share(embedder, encoder_export):
    wave = noise(3.0, seed=4)
    hop = embeddings.Embedder(inference.load_encoder(encoder_export), hop_frames=64)
    outputs = list(hop.of_array(wave))
    assert [o.start for o in outputs] == pytest.approx([0.0, 0.64, 1.28, 1.92])
    out = embeddings.assemble(hop, iter(outputs), "mean")
    # Step 5 (frames 80..95) lies in windows 0 and 1 (frames 0..127 and 64..191).
    shared = (outputs[0].steps[5].mean(0) + outputs[1].steps[1].mean(0)) / 2
    np.testing.assert_allclose(out.steps[5], shared, atol=1e-6)
    np.testing.assert_allclose(out.steps[0], outputs[0].steps[0].mean(0), atol=1e-6)
    assert out.steps.shape[0] == -(-OPTS.num_frames(wave.size) // 16)
    with pytest.raises(ValueError, match="multiple of 16"):
        embeddings.Embedder(hop.encoder, hop_frames=40)


def test_embeddings_normalise_as_the_encoder_was_trained(tmp_path):
    """An encoder trained on other statistics than AudioSet's (ESC-50's here) is fed
    spectrograms normalised with its own: the embedding API and the HEAR module read
    them from the export; a window's CLS output is that of its own normalised fbank."""
    cfg = model_lib.preset("tiny")
    variables = model_lib.Encoder(cfg).init(jax.random.key(1), jnp.zeros((1, 128, 128)))
    norm = audio.NORM_STATS["esc50"]
    checkpoints.export(
        tmp_path / "esc", {"encoder": nn.meta.unbox(variables)["params"]}, cfg,
        kind="pretrain", target_frames=128, norm=norm,
    )  # fmt: skip
    loaded = inference.load_encoder(tmp_path / "esc")
    embedder = embeddings.Embedder(loaded, batch_size=2)
    assert embedder.norm == norm and hear.load_model(str(tmp_path / "esc")).embedder.norm == norm
    wave = noise(1.0, seed=3)
    (window,) = list(embedder.of_array(wave))
    spec, frames = audio.spectrogram(wave - wave.mean(), 128, norm)
    expected = loaded.encode(jnp.asarray(spec[None]), jnp.asarray([-(-frames // 16) * 16]))
    np.testing.assert_allclose(window.cls, np.asarray(expected)[0, 0], atol=1e-5)
    other = next(embeddings.Embedder(loaded, NORM, batch_size=2).of_array(wave))
    assert np.abs(other.cls - window.cls).max() > 1e-3  # the statistics matter


def test_npy_rows_are_written_as_they_come_and_never_left_half_written(tmp_path):
    with cli.NpyRows(tmp_path / "a.npy", 3) as rows:
        rows.append(np.ones((2, 3)))
        rows.append(np.arange(6).reshape(2, 3))
        assert not (tmp_path / "a.npy").exists()
    np.testing.assert_array_equal(
        np.load(tmp_path / "a.npy"), np.concatenate([np.ones((2, 3)), np.arange(6).reshape(2, 3)])
    )
    with pytest.raises(RuntimeError), cli.NpyRows(tmp_path / "b.npy", 3) as rows:
        rows.append(np.ones((1, 3)))
        raise RuntimeError("the audio broke")
    assert list(tmp_path.iterdir()) == [tmp_path / "a.npy"]


# ---------------------------------------------------------------------------- HEAR


@pytest.mark.subprocess
def test_the_real_hearvalidator_passes_on_an_export(encoder_export):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "hearvalidator.validate",
            "asda_jax.hear",
            "-m",
            str(encoder_export),
        ],
        cwd=th.ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "Looks good!" in done.stdout


def test_the_hear_contract_from_a_tenth_of_a_second_to_twenty_minutes(encoder_export):
    model = hear.load_model(str(encoder_export))
    assert isinstance(model, torch.nn.Module) and model.sample_rate == 16_000
    assert model.scene_embedding_size == model.timestamp_embedding_size == 64
    for seconds in (0.1, 1.0, 1200.0):  # up to the 20 minutes HEAR asks for
        sounds = torch.from_numpy(np.stack([noise(seconds, seed=s) for s in range(2)]))
        scene = hear.get_scene_embeddings(sounds, model)
        steps, times = hear.get_timestamp_embeddings(sounds, model)
        n = -(-OPTS.num_frames(sounds.shape[1]) // 16)
        assert scene.shape == (2, 64) and scene.dtype == torch.float32
        assert steps.shape == (2, n, 64) and steps.dtype == torch.float32
        assert times.shape == (2, n) and bool((torch.diff(times) > 0).all())
        assert float(times[0, -1]) < 1000 * seconds + 100
        assert torch.isfinite(steps).all() and not torch.equal(scene[0], scene[1])
    with pytest.raises(ValueError, match="needs a model"):
        hear.load_model()


# ---------------------------------------------------------------------------- unlabelled


def write_noise(path, seconds: float, seed: int):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, noise(seconds, seed, level=0.1), audio.SAMPLE_RATE)
    return path


@pytest.fixture(scope="module")
def recordings(tmp_path_factory):
    """A few long recordings beside every kind of bad file; name → segments expected."""
    root = tmp_path_factory.mktemp("recordings")
    expected = fx.bad_files_tree(root)  # good short files are one segment each
    segments = {name: 1 for name, status in expected.items() if status == "good"}
    segments["very_long.flac"] = 10  # 95 s: 9 × 10.255 s and a 2.7 s tail
    write_noise(root / "field" / "day1" / "dawn.wav", 60.0, 1)
    write_noise(root / "field" / "dusk.flac", 25.0, 2)
    segments |= {"dawn.wav": 6, "dusk.flac": 3}  # tails of 8.5 and 4.5 s
    reasons = collections.Counter(s for s in expected.values() if s != "good")
    return root, segments, dict(reasons)


def test_an_unlabelled_folder_gives_every_segment_once_per_epoch(recordings, tmp_path):
    root, segments, reasons = recordings
    dataset = datasets.prepare("unlabelled_folder", tmp_path / "data", source_dir=root)
    assert dataset.skipped["train"] == reasons and dataset.num_classes == 0
    source = dataset.source("train")
    ids = [source[i]["id"].decode() for i in range(len(source))]
    per_file = collections.Counter(i.rsplit("@", 1)[0].split("/")[-1] for i in ids)
    assert per_file == segments
    # A segment is its file's samples from its start, read by seeking.
    dawn = audio.read_audio(root / "field" / "day1" / "dawn.wav")
    seg = 164_080  # samples of one 1024-frame input
    for i in (i for i, x in enumerate(ids) if x.startswith("field/day1/dawn.wav@")):
        k = round(float(ids[i].rsplit("@", 1)[1]) * audio.SAMPLE_RATE / seg)
        got = audio.read_audio(source[i]["audio"])
        want = dawn[k * seg : (k + 1) * seg]
        np.testing.assert_allclose(got, want - want.mean(), atol=1e-4)
    cfg = pipeline.InputConfig(
        dataset="unlabelled_folder", data_dir=str(tmp_path / "data"), batch_size=1,
        target_frames=64, threads=1, fbank_on="host", seed=5,
    )  # fmt: skip
    stream = iter(pipeline.make_pipeline(cfg, train=True))
    epochs = [[int(next(stream)["index"][0]) for _ in ids] for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(len(ids)))
    assert epochs[0] != epochs[1]  # reshuffled


@pytest.mark.subprocess
def test_pretraining_on_an_unlabelled_folder_resumes_exactly(recordings, tmp_path):
    root, segments, _ = recordings
    data, workdir = tmp_path / "data", tmp_path / "run"
    arg = f"source={root},data_dir={data},mesh=cpu,model=tiny"
    overrides = {k: v for k, v in th.TINY_OVERRIDES.items() if k != "model.preset"}
    overrides |= {"num_train_steps": 4, "checkpoint_every": 2, "data.threads": 1}
    flags = [f"--config.{k}={v}" for k, v in overrides.items()]
    done = subprocess.run(
        [sys.executable, "launch/train.py", f"--config=configs/pretrain_folder.py:{arg}",
         f"--workdir={workdir}", *flags],
        cwd=th.ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert datasets.load("unlabelled_folder", data).split_sizes["train"] == sum(segments.values())
    uninterrupted = {step: values[0] for step, values in th.losses(workdir).items()}
    assert sorted(uninterrupted) == [1, 2, 3, 4]
    shutil.rmtree(workdir / "checkpoints" / "4")  # as if the run had died after step 3
    config = config_lib.load_file("configs/pretrain_folder.py", arg)
    config.update_from_flattened_dict(overrides)
    train_lib.train(config, workdir)
    recorded = th.losses(workdir)  # steps 3 and 4 again, recorded once each
    assert recorded == {step: [loss] for step, loss in uninterrupted.items()}
    metrics = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(m["loss"]) for m in metrics)


# ---------------------------------------------------------------------------- timelines

EVENT_CLASSES = ("hiss", "noise_bursts", "tone")  # of the synthetic dataset's ten
TRUTH = [("tone", 60.0, 90.0), ("noise_bursts", 200.0, 230.0)]
HOP = 1.28  # seconds: the 128-frame window


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A tiny classifier fine-tuned (from random init, about half a minute) on three of
    the synthetic classes, written as an audio_folder; its workdir."""
    root = tmp_path_factory.mktemp("classifier")
    for split, seeds in (("train", range(40)), ("test", range(40, 50))):
        for name in EVENT_CLASSES:
            c = synthetic.CLASS_NAMES.index(name)
            for seed in seeds:
                path = root / "source" / split / name / f"{seed}.wav"
                path.parent.mkdir(parents=True, exist_ok=True)
                sf.write(path, synthetic.clip(c, seed), audio.SAMPLE_RATE)
    datasets.prepare("audio_folder", root / "data", source_dir=root / "source")
    config = config_lib.load_file(
        "configs/finetune_demo.py", f"data_dir={root / 'data'},init_from="
    )
    config.update_from_flattened_dict(
        {
            "model.preset": "tiny", "model.drop_path": 0.0, "num_train_steps": 150,
            "data.dataset": "audio_folder", "eval_data.dataset": "audio_folder",
            "data.batch_size": 16, "eval_data.batch_size": 16, "optim.lr": 3e-3,
            "optim.warmup_steps": 10, "optim.layer_decay": 1.0, "finetune.mask_ratio": 0.0,
        },
    )  # fmt: skip
    train_lib.train(config, root / "run")
    return root / "run"


@pytest.mark.subprocess
def test_a_long_recording_gives_a_timeline_with_its_events(classifier, tmp_path):
    classes = [(synthetic.CLASS_NAMES.index(n), a, b) for n, a, b in TRUTH]
    recording = fx.event_recording(tmp_path / "five_minutes.wav", 300.0, classes)
    output = tmp_path / "timeline.json"
    done, _ = memory.run_measured(
        "launch/infer.py", f"--checkpoint={classifier}", f"--audio={recording}", "--events",
        f"--output={output}", "--top_k=2",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = json.loads(output.read_text())["files"]
    assert len(result["windows"]) == 235  # 300 s / 1.28 s, the last one partial
    assert result["windows"][-1]["end"] == pytest.approx(300.0)
    found = [(e["label"], e["start"], e["end"]) for e in result["events"]]
    assert [label for label, _, _ in found] == [label for label, _, _ in TRUTH], found
    for (_, start, end), (_, true_start, true_end) in zip(found, TRUTH, strict=True):
        assert abs(start - true_start) <= HOP and abs(end - true_end) <= HOP, found
    assert {name for name, _ in result["labels"]} == {"tone", "noise_bursts"}  # max-pooled
    assert "event" in done.stdout and "(max over 235 windows)" in done.stdout


@pytest.mark.subprocess
def test_an_hour_through_extract_and_infer_keeps_memory_bounded(classifier, tmp_path):
    hour = fx.event_recording(tmp_path / "hour.wav", 3600.0, [(0, 1800.0, 1830.0)])
    # Measured against ten minutes, whose run has warmed up the same runtime: memory
    # that grew with the length would show in the difference.
    short = fx.event_recording(tmp_path / "short.wav", 600.0, [(0, 300.0, 330.0)])
    whole_mib = 3600 * audio.SAMPLE_RATE * 4 / 2**20  # the hour as float32: 220 MiB
    for script, extra in (
        ("infer", [f"--output={tmp_path}/hour.csv", "--batch_size=32"]),
        ("extract", [f"--output={tmp_path}/emb", "--batch_size=32"]),
    ):
        grown = {}
        for path in (short, hour):
            done, measured = memory.run_measured(
                f"launch/{script}.py", f"--checkpoint={classifier}", f"--audio={path}", *extra
            )
            assert done.returncode == 0, done.stderr[-3000:]
            grown[path.stem] = measured["reading_growth_mib"]
        print(f"{script}: resident memory grew {grown} MiB while reading")
        assert grown["hour"] - grown["short"] < whole_mib / 3, (script, grown)
    rows = (tmp_path / "hour.csv").read_text().splitlines()
    assert rows[0] == "file,kind,start,end,rank,label,score"
    assert sum(",window," in r for r in rows) == 2813 * 3  # top_k defaults to 5 > 3 classes
    steps = np.load(tmp_path / "emb" / "hour.frames.npy", mmap_mode="r")
    times = np.load(tmp_path / "emb" / "hour.frame_times_ms.npy")
    assert steps.shape == (-(-OPTS.num_frames(3600 * audio.SAMPLE_RATE) // 16), 8 * 64)
    assert times.shape == steps.shape[:1] and times[-1] < 3_600_000
    assert np.load(tmp_path / "emb" / "hour.windows.npy").shape == (2813, 64)


def test_continued_pretraining_starts_student_and_teacher_from_an_exports_encoder(
    recordings, tmp_path
):
    """configs/pretrain_small_corpus.py with init_from= an export of a tiny model: the
    run is the export's architecture and input normalisation, not the recipe's demo
    model, and both encoders start as the export's, the decoder as a fresh run's."""
    root, _, _ = recordings
    source = th.task_on_cpu(th.tiny_config(str(tmp_path), **{"model.depth": 3}))
    initial = nn.meta.unbox(source.init_params(jax.random.PRNGKey(7)))
    exported = checkpoints.export(
        tmp_path / "export", {"encoder": initial["encoder"]}, source.config.model,
        kind="pretrain", target_frames=64, norm=(-3.5, 2.25),
    )  # fmt: skip
    data = tmp_path / "data"
    datasets.prepare("unlabelled_folder", data, source_dir=root)
    arg = f"source={root},data_dir={data},init_from={exported}"
    overrides = {"num_train_steps": 0, "optim.warmup_steps": 0, "data.batch_size": 8,
                 "pretrain.average_top_k_layers": 2,
                 "mask.clone_batch": 2, "data.threads": 1}  # fmt: skip
    config = config_lib.load_file("configs/pretrain_small_corpus.py", arg)
    config.update_from_flattened_dict(overrides)
    state, task, _ = train_lib.train(config, tmp_path / "run")
    assert task.config.model == source.config.model and task.config.model.depth == 3
    assert task.data_cfg.norm == (-3.5, 2.25)
    want = jax.tree.leaves(initial["encoder"])
    for got in (state.params["encoder"], state.teacher):
        for a, b in zip(jax.tree.leaves(got), want, strict=True):
            np.testing.assert_array_equal(a, b)
    fresh = nn.meta.unbox(task.init_params(jax.random.PRNGKey(config.seed)))["decoder"]
    for a, b in zip(jax.tree.leaves(state.params["decoder"]), jax.tree.leaves(fresh), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(config_lib.ConfigError, match="not an export"):
        config_lib.load_file("configs/pretrain_small_corpus.py", f"init_from={tmp_path / 'run'}")
