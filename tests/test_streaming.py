"""Audio as it arrives (asda_jax/streaming.py, launch/stream.py): the same windows,
scores, embeddings and events as the offline tools, wherever the chunks are cut; one
compiled program in steady state; a buffer that does not grow; bad chunks refused."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf

from asda_jax import audio, checkpoints, embeddings, inference, streaming, timeline, windows
from asda_jax import model as model_lib
from asda_jax.data import synthetic
from asda_jax.testing import fixtures as fx
from tests import train_helpers as th

SR = audio.SAMPLE_RATE
TARGET_FRAMES = 256  # the tiny models' input: 2.56 s
NAMES = ["tone", "noise_bursts", "chirp_up"]
EVENTS = [(synthetic.CLASS_NAMES.index(name), *span) for name, span in
          (("tone", (6.0, 12.0)), ("noise_bursts", (20.0, 27.0)))]  # fmt: skip
# A random classifier's top label changes often; every window of audio above the floor
# then starts or extends an event, so the events test the rule, not the model.
EVENT_RULE = dict(threshold=0.0, silence_db=-50.0)


@pytest.fixture(scope="module")
def classifier_export(tmp_path_factory):
    """A randomly initialised tiny classifier of three classes (softmax), exported for
    a 2.56 s input, and its label CSV."""
    cfg = model_lib.preset("tiny")
    spec = jnp.zeros((1, TARGET_FRAMES, cfg.num_mel_bins))
    variables = model_lib.Classifier(cfg, len(NAMES)).init(jax.random.key(1), spec)
    root = tmp_path_factory.mktemp("classifier")
    checkpoints.export(
        root / "export", nn.meta.unbox(variables)["params"], cfg, kind="finetune",
        pooling="cls", scores="softmax", target_frames=TARGET_FRAMES,
        norm=audio.NORM_STATS["audioset"],
    )  # fmt: skip
    labels = root / "labels.csv"
    labels.write_text("".join(f"{i},{name}\n" for i, name in enumerate(NAMES)))
    return root / "export", labels


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    """32 s of a faint floor with two synthetic events, 16 kHz mono PCM_16."""
    path = tmp_path_factory.mktemp("recording") / "events.wav"
    return fx.event_recording(path, 32.0, EVENTS)


def random_chunks(wave: np.ndarray, seed: int) -> list[np.ndarray]:
    """``wave`` cut at random: log-uniform sizes from 1 sample to 3 s, single samples
    among them."""
    rng = np.random.default_rng(seed)
    chunks, at = [], 0
    while at < wave.shape[0]:
        size = 1 if rng.random() < 0.1 else int(np.exp(rng.uniform(0, np.log(3 * SR))))
        chunks.append(wave[at : at + size])
        at += size
    return chunks


def streamed(stream: streaming.Stream, chunks) -> list:
    out = []
    for chunk in chunks:
        out.extend(stream.push(chunk))
    return out + stream.finish()


def of_type(outputs, kind) -> list:
    return [o for o in outputs if isinstance(o, kind)]


# (window s, hop s, window frames): a window is whole 16-frame patches, 2 s → 12.5 → 13
@pytest.mark.parametrize("window, hop, frames", [(None, 0.5, 256), (1.0, 0.5, 96), (2.0, 0.3, 208)])
def test_a_stream_cut_anywhere_gives_the_offline_scores_and_events(
    classifier_export, recording, window, hop, frames
):
    export, labels = classifier_export
    stream, source = streaming.open_stream(
        export, window=window, hop=hop, labels=labels, **EVENT_RULE
    )
    wave, _ = sf.read(recording, dtype="int16")
    live = streamed(stream, random_chunks(wave, seed=len(str(window))))
    # Offline: the file read in blocks and scored in batches of four, as infer.py does.
    loaded = inference.load_classifier(export)
    windowing = source.windowing
    assert (windowing.frames, windowing.hop) == (frames, round(hop * 100))
    masked = timeline.masks_padding(windowing, TARGET_FRAMES)
    assert masked == (window is not None)
    cut = windows.windows_of_file(recording, windowing, loaded.input.norm, block_seconds=5.0)
    offline = list(timeline.classify_windows(loaded.classify, cut, 4, masked))
    hops = of_type(live, timeline.WindowScores)
    assert len(hops) == len(offline) == windowing.count(wave.size)
    for a, b in zip(hops, offline, strict=True):
        assert (a.start, a.end, a.level_db) == (b.start, b.end, b.level_db)
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
    expected = timeline.events(offline, NAMES, windowing, **EVENT_RULE)
    closed, opened = of_type(live, timeline.Event), of_type(live, timeline.EventStart)
    assert len(expected) >= 2
    assert [e[:3] for e in closed] == [e[:3] for e in expected]
    np.testing.assert_allclose([e.peak for e in closed], [e.peak for e in expected], atol=1e-5)
    assert [(s.start, s.label) for s in opened] == [(e.start, e.label) for e in closed]
    # Each event is printed when it closes: after the window that ended it, never before.
    for event in closed:
        position = live.index(event)
        assert all(h.start <= event.end for h in of_type(live[:position], timeline.WindowScores))
    # Silence between the events opens none.
    assert all(not 13.5 < e.start < 19.0 for e in closed)


def stereo_44k(path) -> np.ndarray:
    """7.3 s of int16 stereo at 44.1 kHz, different in each channel, written to ``path``."""
    rate = 44_100
    rng = np.random.default_rng(3)
    t = np.arange(int(7.3 * rate)) / rate
    left = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size)
    right = 0.2 * np.sin(2 * np.pi * 1500 * t)
    stereo = (np.stack([left, right], axis=1) * 32767).astype(np.int16)
    sf.write(path, stereo, rate, subtype="PCM_16")
    return stereo


def test_resampling_and_channel_mixing_equal_the_offline_front_end(tmp_path):
    """int16 stereo chunks through the stream's steps equal the file's blocks decoded,
    mixed and resampled, sample for sample."""
    stereo = stereo_44k(tmp_path / "stereo.wav")
    mono = audio.MonoResampler(44_100)
    chunks = random_chunks(stereo, seed=5)
    live = [mono(streaming.float_frames(c, 2)) for c in chunks] + [mono.flush()]
    offline = audio.read_blocks(tmp_path / "stereo.wav", block_seconds=0.7)
    np.testing.assert_array_equal(np.concatenate(live), np.concatenate(list(offline)))


def test_an_encoder_stream_of_44k_stereo_equals_extract(encoder_export, tmp_path):
    path = tmp_path / "stereo.wav"
    stereo = stereo_44k(path)
    stream, source = streaming.open_stream(
        encoder_export, window=0.64, hop=0.32, rate=44_100, channels=2
    )
    assert source.kind == "encoder" and source.windowing.frames == 64
    live = streamed(stream, random_chunks(stereo, seed=9))
    embedder = embeddings.Embedder(
        inference.load_encoder(encoder_export), window_frames=64, hop_frames=32, batch_size=4
    )
    offline = list(embedder.of_file(path, block_seconds=1.0))
    assert len(live) == len(offline) == source.windowing.count(int(7.3 * SR))
    for a, b in zip(live, offline, strict=True):
        assert (a.index, a.start, a.end, a.num_frames) == (b.index, b.start, b.end, b.num_frames)
        np.testing.assert_allclose(a.cls, b.cls, atol=1e-5)
        np.testing.assert_allclose(a.steps, b.steps, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of 16 frames"):
        streaming.open_stream(encoder_export, window=0.64, hop=0.5)


def test_an_endless_stream_keeps_its_buffer_bounded_and_compiles_once(classifier_export):
    """Ten minutes of 48 kHz stereo in 0.1 s chunks: the buffer never holds more than a
    window and a chunk, and no program is compiled after the first window."""
    export, labels = classifier_export
    rate, chunk = 48_000, 4_800
    stream, source = streaming.open_stream(
        export, window=1.0, hop=0.5, rate=rate, channels=2, labels=labels, **EVENT_RULE
    )
    compiled = []

    def count(name, *_, **__):
        if name.endswith("backend_compile_duration"):  # also on a compilation-cache hit
            compiled.append(name)

    rng = np.random.default_rng(0)
    limit = source.windowing.samples + chunk * SR // rate + 64  # and the resampler's lag
    most, hops, warm = 0, 0, None
    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        for k in range(6000):
            at = (np.arange(chunk) + k * chunk) / rate
            tone = np.sin(2 * np.pi * (300 + k % 40 * 20) * at)
            block = 0.2 * tone[:, None] + 0.01 * rng.standard_normal((chunk, 2))
            hops += len(of_type(stream.push(block.astype(np.float32)), timeline.WindowScores))
            most = max(most, stream.buffered_samples)
            if hops and warm is None:
                warm = len(compiled)  # the first window compiled what the stream runs
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
    assert stream.samples_in == 6000 * chunk
    assert hops == pytest.approx(600 / 0.5, abs=3)
    assert most <= limit, (most, limit)
    assert warm >= 1 and len(compiled) == warm, compiled


def test_bad_chunks_are_refused_and_leave_the_stream_as_it_was(classifier_export, recording):
    export, labels = classifier_export
    wave, _ = sf.read(recording, dtype="float32")
    wave = wave[: 6 * SR]

    def fresh():
        return streaming.open_stream(export, window=1.0, hop=0.5, labels=labels)[0]

    clean = streamed(fresh(), np.array_split(wave, 7))
    stream = fresh()
    out = []
    for i, chunk in enumerate(np.array_split(wave, 7)):
        bad = chunk.copy()
        bad[len(bad) // 2] = (np.nan, np.inf, -np.inf)[i % 3]
        with pytest.raises(audio.AudioError, match="NaN or infinite") as e:
            stream.push(bad)
        assert e.value.reason == "non_finite"
        for wrong, message in (
            (chunk.astype(np.uint8), "type uint8"),
            (chunk.astype(np.complex64), "type complex64"),
            (np.stack([chunk, chunk], axis=1), r"shape \(\d+, 2\) for a stream of 1"),
            (chunk[None, :], "for a stream of 1 channel"),
        ):
            with pytest.raises(streaming.StreamError, match=message):
                stream.push(wrong)
        with pytest.raises(streaming.StreamError, match="changed from 16000 Hz to 48000 Hz"):
            stream.push(chunk, rate=48_000)
        out.extend(stream.push(chunk, rate=SR))
    out.extend(stream.finish())
    assert len(out) == len(clean)
    pairs = zip(
        of_type(out, timeline.WindowScores), of_type(clean, timeline.WindowScores), strict=True
    )
    for a, b in pairs:
        np.testing.assert_array_equal(a.scores, b.scores)
    with pytest.raises(streaming.StreamError, match="finished"):
        stream.push(wave[:100])
    short = fresh()
    short.push(wave[:399])
    with pytest.raises(audio.AudioError, match="shorter than one 25 ms frame"):
        short.finish()
    with pytest.raises(ValueError, match="longer than the model's input"):
        streaming.open_stream(export, window=3.0, labels=labels)


def launch_stream(*args: str, stdin: bytes) -> subprocess.CompletedProcess:
    command = [sys.executable, "launch/stream.py", *args]
    return subprocess.run(command, cwd=th.ROOT, input=stdin, capture_output=True, timeout=300)


@pytest.mark.subprocess
def test_stream_py_on_piped_pcm_equals_infer_py_on_the_file(classifier_export, recording, tmp_path):
    export, labels = classifier_export
    shared = [f"--checkpoint={export}", f"--labels={labels}", "--window=1", "--hop=0.5",
              "--events", "--threshold=0", "--silence_db=-50", "--top_k=3"]  # fmt: skip
    pcm = sf.read(recording, dtype="int16")[0].tobytes()
    done = launch_stream(*shared, stdin=pcm + b"\x01")  # and half a frame at the end
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert b"dropped 1 bytes at the end" in done.stderr
    lines = [json.loads(x) for x in done.stdout.decode().splitlines()]
    output = tmp_path / "timeline.json"
    infer = subprocess.run(
        [sys.executable, "launch/infer.py", *shared, f"--audio={recording}", f"--output={output}"],
        cwd=th.ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert infer.returncode == 0, infer.stderr[-3000:]
    (offline,) = json.loads(output.read_text())["files"]
    hops = [x for x in lines if x["type"] == "hop"]
    assert len(hops) == len(offline["windows"]) == windows.Windowing(96, 50).count(32 * SR)
    for live, window in zip(hops, offline["windows"], strict=True):
        assert (live["start"], live["end"]) == (window["start"], window["end"])
        assert [n for n, _ in live["labels"]] == [n for n, _ in window["labels"]]
        np.testing.assert_allclose(
            [s for _, s in live["labels"]], [s for _, s in window["labels"]], atol=1e-5
        )
    events = [x for x in lines if x["type"] == "event"]
    assert [(e["start"], e["end"], e["label"]) for e in events] == [
        (e["start"], e["end"], e["label"]) for e in offline["events"]
    ]
    assert sum(x["type"] == "event_start" for x in lines) == len(events) >= 2
    # A file played at its own speed: paced, and the same windows as far as it goes.
    head = tmp_path / "head.wav"
    sf.write(head, sf.read(recording, frames=4 * SR, dtype="int16")[0], SR, subtype="PCM_16")
    began = time.monotonic()
    played = launch_stream(*shared, f"--audio={head}", "--realtime", stdin=b"")
    assert played.returncode == 0, played.stderr.decode()[-3000:]
    assert time.monotonic() - began >= 4.0  # not sooner than the audio came
    heard = [json.loads(x) for x in played.stdout.decode().splitlines()]
    heard = [x for x in heard if x["type"] == "hop"]
    assert len(heard) == windows.Windowing(96, 50).count(4 * SR)
    for live, window in zip(heard[:-1], hops, strict=False):  # the last one partial
        assert live == window
    # End of input before one 25 ms frame: a clear error, exit 1.
    empty = launch_stream(*shared, stdin=b"")
    assert empty.returncode == 1 and b"shorter than one 25 ms frame" in empty.stderr


@pytest.mark.subprocess
def test_extract_py_with_a_window_equals_an_encoder_stream(encoder_export, tmp_path):
    path = tmp_path / "stereo.wav"
    stereo = stereo_44k(path)
    stream, _ = streaming.open_stream(
        encoder_export, window=0.64, hop=0.32, rate=44_100, channels=2
    )
    live = streamed(stream, random_chunks(stereo, seed=2))
    command = [sys.executable, "launch/extract.py", f"--checkpoint={encoder_export}",
               f"--audio={path}", f"--output={tmp_path / 'emb'}", "--window=0.64",
               "--hop=0.32"]  # fmt: skip
    done = subprocess.run(command, cwd=th.ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    spans = np.load(tmp_path / "emb" / "stereo.window_spans.npy")
    np.testing.assert_array_equal(spans, [(out.start, out.end) for out in live])
    np.testing.assert_allclose(
        np.load(tmp_path / "emb" / "stereo.windows.npy"), [out.cls for out in live], atol=1e-5
    )
