"""Labels (or embeddings) of audio as it arrives, one JSON line per hop and per event.

    ffmpeg -i http://radio/feed -f s16le -ac 1 -ar 16000 - | \
        python launch/stream.py --checkpoint=/ckpt/as20k --labels=labels.csv --window=2 --hop=0.5
    arecord -f S16_LE -r 16000 -c 1 | python launch/stream.py --checkpoint=... --events
    python launch/stream.py --checkpoint=... --audio=recording.flac --realtime
    python launch/stream.py --checkpoint=... --mic        # where sounddevice is installed

Reads raw PCM from standard input (``--format`` s16le, s32le or f32le, ``--rate``,
``--channels`` interleaved), an audio file (``--audio``; ``--realtime`` paces it at
its own speed, as a live source would come) or a microphone (``--mic``), and prints,
as each window completes (asda_jax/streaming.py):

  {"type": "hop", "start": s, "end": s, "level_db": dB, "labels": [[name, score], ...]}
  {"type": "event_start", "start": s, "label": name, "score": p}       (--events)
  {"type": "event", "start": s, "end": s, "label": name, "peak": p}    (--events)

or, for an encoder, ``{"type": "hop", "start", "end", "embedding": [...]}`` (the
window's CLS output). Times are seconds from the stream's first sample. The window is
the model's input unless ``--window`` is shorter (whole 0.16 s time patches; the
padding masked), the hop the window unless ``--hop``; the outputs equal
``launch/infer.py``'s (``extract.py``'s) with the same ``--window`` and ``--hop`` on a
file of the same samples. At the end of the input (or Ctrl-C) the last, partial window
is flushed and the open event closed; the exit code is then 0. It is 2 for bad flags
, a checkpoint or a file it cannot read, 1 for input that is not audio (shorter than one 25 ms
frame, NaN or infinite float samples), after printing what came before it.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from asda_jax import launch_env

launch_env.reexec_with_launcher_environment()  # as launch/train.py: asda_jax/launch_env.py

import json
import sys
import time
from collections.abc import Iterator

import numpy as np
import soundfile as sf
from absl import app, flags

from asda_jax import audio, checkpoints, cli, embeddings, streaming, timeline

RAW_FORMATS = {"s16le": "<i2", "s32le": "<i4", "f32le": "<f4"}
READ_BYTES = 1 << 16  # at most this much of standard input per push: what is there

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "A classifier or encoder: a workdir or an export.")
flags.DEFINE_integer("step", None, "Checkpoint step of a workdir (default: the latest).")
flags.DEFINE_string("audio", None, "Read this file instead of standard input.")
flags.DEFINE_bool("realtime", False, "With --audio: feed the file at its own speed.")
flags.DEFINE_bool("mic", False, "Read the default microphone (needs sounddevice).")
flags.DEFINE_enum("format", "s16le", list(RAW_FORMATS), "Standard input's sample format.")
flags.DEFINE_integer("rate", audio.SAMPLE_RATE, "Standard input's (or the mic's) sample rate.")
flags.DEFINE_integer("channels", 1, "Standard input's (or the mic's) interleaved channels.")
flags.DEFINE_float("window", None, "Window seconds, at most the model's input (default).")
flags.DEFINE_float("hop", None, "Seconds between window starts (default: the window).")
flags.DEFINE_float("chunk", 0.1, "Seconds per read of a file or the microphone.")
flags.DEFINE_string("labels", None, "Label CSV with display names.")
flags.DEFINE_integer("top_k", 5, "Labels printed per hop.")
flags.DEFINE_bool("events", False, "Print sound events as they open and close.")
flags.DEFINE_float("threshold", 0.5, "Lowest top score of a window in an event.")
flags.DEFINE_float("silence_db", -60.0, "Windows quieter than this (dBFS RMS) are silence.")
flags.DEFINE_integer("windows_per_call", 1, "Windows scored per call when several are ready.")
flags.mark_flags_as_required(["checkpoint"])


def stdin_chunks(dtype: str, channels: int) -> Iterator[np.ndarray]:
    """Standard input as (n, channels) chunks of what each read finds there; bytes of a
    partial frame wait for the next read. A partial frame at the end is reported."""
    frame_bytes = np.dtype(dtype).itemsize * channels
    pending = b""
    while data := sys.stdin.buffer.read1(READ_BYTES):
        data = pending + data
        whole = len(data) - len(data) % frame_bytes
        pending = data[whole:]
        if whole:
            yield np.frombuffer(data[:whole], dtype).reshape(-1, channels)
    if pending:
        print(f"dropped {len(pending)} bytes at the end: less than one frame of "
              f"{frame_bytes} bytes", file=sys.stderr)  # fmt: skip


def file_chunks(path: str, seconds: float, realtime: bool):
    """(chunks of ``seconds`` at the file's rate and channels, that rate, the channels),
    paced at the file's own speed with ``realtime``."""
    info = sf.info(path)  # raises on what is not audio, before anything is printed

    def chunks():
        begin, fed = time.perf_counter(), 0
        with sf.SoundFile(path) as f:
            size = max(1, round(seconds * f.samplerate))
            for block in f.blocks(blocksize=size, dtype="float32", always_2d=True):
                fed += block.shape[0]
                if realtime:  # a block is there once its last sample would have been
                    time.sleep(max(0.0, begin + fed / f.samplerate - time.perf_counter()))
                yield block

    return chunks(), info.samplerate, info.channels


def mic_chunks(rate: int, channels: int, seconds: float) -> Iterator[np.ndarray]:
    try:
        import sounddevice  # optional: not in requirements.txt
    except ImportError as e:
        raise ValueError("--mic needs the sounddevice package (pip install sounddevice)") from e
    size = max(1, round(seconds * rate))
    with sounddevice.InputStream(samplerate=rate, channels=channels, dtype="float32") as mic:
        while True:
            block, _ = mic.read(size)
            yield block


def line(output, top_k: int, names) -> dict:
    if isinstance(output, timeline.WindowScores):
        labels = timeline.top_k(output.scores, names, top_k)
        return {"type": "hop", "start": output.start, "end": output.end,
                "level_db": output.level_db, "labels": labels}  # fmt: skip
    if isinstance(output, embeddings.WindowOutput):
        return {"type": "hop", "start": output.start, "end": output.end,
                "embedding": output.cls.tolist()}  # fmt: skip
    if isinstance(output, timeline.EventStart):
        return {"type": "event_start", **output._asdict()}
    return {"type": "event", **output._asdict()}


def main(argv):
    del argv
    try:
        if FLAGS.realtime and not FLAGS.audio:
            raise ValueError("--realtime plays a file: pass --audio")
        rate, channels, chunks = FLAGS.rate, FLAGS.channels, None
        if FLAGS.audio:
            chunks, rate, channels = file_chunks(FLAGS.audio, FLAGS.chunk, FLAGS.realtime)
        stream, source = streaming.open_stream(
            FLAGS.checkpoint, window=FLAGS.window, hop=FLAGS.hop, rate=rate,
            channels=channels, labels=FLAGS.labels, threshold=FLAGS.threshold,
            silence_db=FLAGS.silence_db, windows_per_call=FLAGS.windows_per_call, step=FLAGS.step,
        )  # fmt: skip
        if chunks is None:
            chunks = (
                mic_chunks(rate, channels, FLAGS.chunk)
                if FLAGS.mic
                else stdin_chunks(RAW_FORMATS[FLAGS.format], channels)
            )
    except (checkpoints.CheckpointMismatch, FileNotFoundError, ValueError, sf.LibsndfileError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    w, rate_16k = source.windowing, source.windowing.opts.sample_rate
    print(f"{source.kind}: window {w.samples / rate_16k:.3f} s, hop "
          f"{w.hop_samples / rate_16k:.2f} s (model input {source.target_frames} frames), "
          f"reading at {rate} Hz × {channels}", file=sys.stderr, flush=True)  # fmt: skip

    def emit(outputs) -> None:
        for output in outputs:
            if FLAGS.events or not isinstance(output, timeline.EventStart | timeline.Event):
                print(json.dumps(line(output, FLAGS.top_k, source.names)), flush=True)

    code = 0
    try:
        for chunk in chunks:
            emit(stream.push(chunk))
    except KeyboardInterrupt:
        pass  # the end of the stream: flushed below
    except audio.AudioError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 1
    try:
        emit(stream.finish())
    except audio.AudioError as e:
        print(f"error: the stream ended after {stream.samples_in} samples: {e}", file=sys.stderr)
        code = 1
    print(f"{stream.samples_in / rate:.2f} s of audio", file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    cli.start()  # before the flags: a config file may already read a gs:// path
    app.run(main)
