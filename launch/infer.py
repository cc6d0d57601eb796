"""Labels of audio files of any length from a fine-tuned checkpoint (a workdir or an export).

    python launch/infer.py --checkpoint=/ckpt/as20k --audio=recording.flac \
        [--labels=class_labels_indices.csv] [--top_k=5] [--window=2] [--hop=5.12] [--pooling=max] \
        [--events --threshold=0.5] [--output=timeline.csv|timeline.json] [--plot=file.png]

Each file is cut into windows of the run's training length (``--hop`` seconds apart,
default: the window, rounded to 10 ms frames) and read in blocks, so recordings of any
length work in bounded memory. ``--window`` sets a shorter window (rounded to whole
0.16 s time patches), each scored on its own frames with the padding masked: what
``launch/stream.py`` computes as audio arrives. A file that fits one window prints one
line of top-k labels, as a clip is scored in evaluation (padded to the training
length; with a shorter ``--window``, masked). A longer one prints a timeline (per
window its start, end and top-k labels) and the file's labels pooled over the windows
(``--pooling``: max or mean). ``--events`` merges consecutive
windows with the same top label of at least ``--threshold`` into events; windows below
``--silence_db`` are silence (asda_jax/timeline.py). ``--output`` writes everything as
CSV (one row per file, window or event label) or JSON, by its suffix. ``--plot`` draws
each file: its log-mel spectrogram, the top classes' scores over time and the events
under them (a .png for one file; for a folder, a folder of them).

Display names come from --labels (AudioSet's ``index,mid,display_name`` CSV, or
``index,name``), else from the run's prepared dataset, else, for a model that says it
was trained on AudioSet's 527 classes (an imported EAT, SSLAM or release classifier),
from AudioSet's names shipped with the package. Unreadable files are reported
and skipped; the exit code is 1 only if none succeeded.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from asda_jax import launch_env

launch_env.reexec_with_launcher_environment()  # as launch/train.py: asda_jax/launch_env.py

import csv
import io
import json
import sys
import tempfile

import numpy as np
from absl import app, flags
from etils import epath

from asda_jax import audio, checkpoints, cli, inference, plots, storage, timeline, windows

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "A fine-tuning run's workdir, or a classifier export.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_string("audio", None, "An audio file or a folder of them.")
flags.DEFINE_string("labels", None, "Label CSV with display names.")
flags.DEFINE_integer("top_k", 5, "Labels shown per file and per window.")
flags.DEFINE_float("window", None, "Window seconds, at most the model's input (default).")
flags.DEFINE_float("hop", None, "Seconds between window starts (default: the window).")
flags.DEFINE_enum("pooling", "max", timeline.FILE_POOLINGS, "File scores over the windows.")
flags.DEFINE_bool("events", False, "Merge consecutive windows into sound events.")
flags.DEFINE_float("threshold", 0.5, "Lowest top score of a window in an event.")
flags.DEFINE_float("silence_db", -60.0, "Windows quieter than this (dBFS RMS) are silence.")
flags.DEFINE_integer("batch_size", None, "Windows per call (default: the chip's).")
flags.DEFINE_string("output", None, "Write the results here: a .csv or .json file.")
flags.DEFINE_string("plot", None, "Draw each file here: a .png (one file) or a folder (several).")
flags.mark_flags_as_required(["checkpoint", "audio"])


def windowing_of(loaded: inference.LoadedClassifier) -> windows.Windowing:
    frames = loaded.input.target_frames
    if FLAGS.window is not None:
        frames = windows.window_frames(FLAGS.window, loaded.cfg.patch_size, frames)
    hop = frames if FLAGS.hop is None else windows.hop_frames(FLAGS.hop)
    return windows.Windowing(frames, hop)


def shown(labels) -> str:
    return "  ".join(f"{n} {s:.3f}" for n, s in labels)


def labelled(
    path: epath.Path, loaded: inference.LoadedClassifier, windowing, names, png=None
) -> dict:
    """Everything known of one file: its windows' labels, its own, its events; with
    ``png``, its picture drawn there."""
    stream = windows.windows_of_file(path, windowing, loaded.input.norm)
    batch = FLAGS.batch_size or inference.here().hardware.forms.windows_per_call
    masked = timeline.masks_padding(windowing, loaded.input.target_frames)
    rows = list(timeline.classify_windows(loaded.classify, stream, batch, masked))
    result = {
        "file": str(path),
        "seconds": rows[-1].end,
        "pooling": FLAGS.pooling if len(rows) > 1 else "one window",
        "labels": timeline.top_k(timeline.file_scores(rows, FLAGS.pooling), names, FLAGS.top_k),
        "windows": [
            {"start": r.start, "end": r.end, "labels": timeline.top_k(r.scores, names, FLAGS.top_k)}
            for r in rows
        ],
    }
    if not (FLAGS.events or png is not None):
        return result
    found = timeline.events(rows, names, windowing, FLAGS.threshold, FLAGS.silence_db)
    if FLAGS.events:
        result["events"] = [e._asdict() for e in found]
    if png is not None:
        result["plot"] = plot(path, rows, names, found, png)
    return result


def picture_path(path: epath.Path, root: epath.Path) -> epath.Path:
    """Where ``--plot`` puts a file's picture: the .png it names, or in the folder it
    names, the file's path under ``--audio`` with .png added."""
    plot = storage.path(FLAGS.plot)
    return plot if plot.suffix == ".png" else plot / (str(path.relative_to(root)) + ".png")


def plot(path: epath.Path, rows, names, found, png: epath.Path) -> str:
    """The file's picture: its log-mel spectrogram, the top classes' window scores over
    time, and the events under them (``--threshold``, ``--silence_db``)."""
    storage.make_folder(png.parent)
    times = np.array([(r.start + r.end) / 2 for r in rows])
    scores = np.stack([r.scores for r in rows])
    spans = [(e.start, e.end, e.label) for e in found]
    with tempfile.TemporaryDirectory() as local:  # matplotlib writes local files
        drawn = plots.recording(audio.log_mel_overview(path), rows[-1].end, times, scores,
                                names, spans, os.path.join(local, "plot.png"))  # fmt: skip
        storage.copy_file(epath.Path(drawn), png)
    return str(png)


def report(result: dict) -> str:
    """The file's line, then its timeline and events when it has more than one window."""
    lines = [shown(result["labels"])]
    if len(result["windows"]) > 1:
        lines[0] += f"   ({result['pooling']} over {len(result['windows'])} windows)"
        lines += [
            f"  {w['start']:9.2f} {w['end']:9.2f}  {shown(w['labels'])}" for w in result["windows"]
        ]
    lines += [
        f"  event {e['start']:9.2f} {e['end']:9.2f}  {e['label']} {e['peak']:.3f}"
        for e in result.get("events", [])
    ]
    return "\n".join(lines)


def csv_rows(result: dict):
    """Long format: file, kind (file, window, event), start, end, rank, label, score."""
    for rank, (name, score) in enumerate(result["labels"], 1):
        yield [result["file"], "file", 0.0, result["seconds"], rank, name, score]
    for w in result["windows"]:
        for rank, (name, score) in enumerate(w["labels"], 1):
            yield [result["file"], "window", w["start"], w["end"], rank, name, score]
    for e in result.get("events", []):
        yield [result["file"], "event", e["start"], e["end"], 1, e["label"], e["peak"]]


def write(results: list[dict], path: epath.Path) -> None:
    if path.suffix == ".json":
        path.write_text(json.dumps({"files": results}, indent=1))
        return
    text = io.StringIO()  # written whole: an object in a bucket cannot be appended to
    writer = csv.writer(text)
    writer.writerow(["file", "kind", "start", "end", "rank", "label", "score"])
    for result in results:
        writer.writerows(csv_rows(result))
    path.write_text(text.getvalue())


def main(argv):
    del argv
    try:
        if FLAGS.output and storage.path(FLAGS.output).suffix not in (".csv", ".json"):
            raise ValueError(f"--output must end in .csv or .json, got {FLAGS.output}")
        loaded = inference.load_classifier(FLAGS.checkpoint, FLAGS.step)
        names = inference.class_names(loaded.input, FLAGS.labels)
        windowing = windowing_of(loaded)
        files, root = cli.audio_inputs(FLAGS.audio)
        if FLAGS.plot and len(files) > 1 and storage.path(FLAGS.plot).suffix == ".png":
            raise ValueError("--plot for a folder of files names a folder, not a .png")
        if FLAGS.output:
            storage.make_folder(storage.path(FLAGS.output).parent)
    except (checkpoints.CheckpointMismatch, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    results = []

    def label(path: epath.Path) -> str:
        png = picture_path(path, root) if FLAGS.plot else None
        results.append(labelled(path, loaded, windowing, names, png))
        return report(results[-1])

    code = cli.run_over_files(files, label, "infer")
    if FLAGS.output:
        write(results, storage.path(FLAGS.output))
        print(f"wrote {FLAGS.output}")
    sys.exit(code)


if __name__ == "__main__":
    cli.start()  # before the flags: a config file may already read a gs:// path
    app.run(main)
