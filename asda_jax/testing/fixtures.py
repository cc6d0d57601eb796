"""Small source trees in each dataset's real layout, and recordings of synthetic events,
written at test time."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import soundfile as sf

from asda_jax.data import builders, synthetic

SR = 16_000


def write_tone(path: Path, freq: float, seconds: float = 0.5, rate: int = SR, channels: int = 1):
    """A tone file whose frequency identifies it; format from the suffix (``.opus``:
    Ogg Opus, which libsndfile does not infer)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(rate * seconds)) / rate
    wave = 0.3 * np.sin(2 * np.pi * freq * t)
    data = np.stack([wave] * channels, axis=1) if channels > 1 else wave
    opus = dict(format="OGG", subtype="OPUS") if path.suffix == ".opus" else {}
    sf.write(path, data, rate, **opus)
    return path


def esc50_tree(root: Path, classes=("dog", "rain", "clock_tick")) -> dict[str, int]:
    """meta/esc50.csv + audio/: two clips per fold; returns filename → target."""
    rows, targets = [], {}
    for fold in range(1, 6):
        for k in range(2):
            target = (fold + k) % len(classes)
            name = f"{fold}-{1000 + k}-A-{target}.wav"
            write_tone(root / "audio" / name, 300 + 100 * target, rate=44_100)
            rows.append([name, fold, target, classes[target], "False", 1000 + k, "A"])
            targets[name] = target
    (root / "meta").mkdir(parents=True, exist_ok=True)
    with open(root / "meta" / "esc50.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filename", "fold", "target", "category", "esc10", "src_file", "take"])
        writer.writerows(rows)
    return targets


def speech_commands_tree(root: Path, words=("yes", "no", "up")) -> None:
    """Three clips per word; the first of each is validation, the second test."""
    validation, testing = [], []
    for w, word in enumerate(words):
        for k in range(3):
            name = f"speaker{k}_nohash_0.wav"
            write_tone(root / word / name, 400 + 50 * w, seconds=1.0)
            (validation if k == 0 else testing if k == 1 else []).append(f"{word}/{name}")
    write_tone(root / "_background_noise_" / "white.wav", 100, seconds=1.0)
    (root / "validation_list.txt").write_text("\n".join(validation) + "\n")
    (root / "testing_list.txt").write_text("\n".join(testing) + "\n")


AUDIOSET_LABELS = [("/m/09x0r", "Speech"), ("/m/04rlf", "Music"), ("/m/0jbk", "Animal")]


def audioset_segments_tree(root: Path) -> dict[str, dict[str, tuple[int, ...]]]:
    """AudioSet's CSVs and audio with the three file-naming styles; one clip missing."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "class_labels_indices.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "mid", "display_name"])
        writer.writerows([i, mid, name] for i, (mid, name) in enumerate(AUDIOSET_LABELS))
    clips = {
        "balanced_train": {
            "aaaaaaaaaaa": (0,),
            "bbbbbbbbbbb": (0, 1),
            "Ycccccccccc": (2,),  # an id that itself starts with Y
            "ddddddddddd": (1,),  # listed, not downloaded
        },
        "eval": {"eeeeeeeeeee": (1, 2), "fffffffffff": (0,)},
    }
    names = {
        "aaaaaaaaaaa": "Yaaaaaaaaaaa.wav",
        "bbbbbbbbbbb": "bbbbbbbbbbb_30.000.flac",
        "Ycccccccccc": "Ycccccccccc.wav",
        "eeeeeeeeeee": "Yeeeeeeeeeee.wav",
        "fffffffffff": "fffffffffff.wav",
    }
    for split, entries in clips.items():
        lines = [
            "# Segments csv created for a test",
            "# YTID, start_seconds, end_seconds, positive_labels",
        ]
        for i, (ytid, labels) in enumerate(entries.items()):
            mids = ",".join(AUDIOSET_LABELS[j][0] for j in labels)
            lines.append(f'{ytid}, 30.000, 40.000, "{mids}"')
            if ytid in names:
                write_tone(root / "audio" / split / names[ytid], 200 + 150 * i)
        (root / f"{split}_segments.csv").write_text("\n".join(lines) + "\n")
    return clips


def audioset_manifest_tree(root: Path) -> list[tuple[str, tuple[int, ...]]]:
    """The release's label_descriptors.csv, train.tsv/.lbl; one entry too short to keep."""
    audio_root = root / "wavs"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "label_descriptors.csv", "w", newline="") as f:
        csv.writer(f).writerows([i, mid, name] for i, (mid, name) in enumerate(AUDIOSET_LABELS))
    entries = [("Yclip000001", (0, 2), 1.0), ("Yclip000002", (1,), 1.0), ("Yclip000003", (2,), 0.5)]
    tsv, lbl = [str(audio_root)], []
    for i, (clip_id, labels, seconds) in enumerate(entries):
        write_tone(audio_root / f"{clip_id}.wav", 300 + 100 * i, seconds=seconds)
        tsv.append(f"{clip_id}.wav\t{int(seconds * SR)}")
        lbl.append(f"{clip_id}\t" + ",".join(AUDIOSET_LABELS[j][0] for j in labels))
    (root / "train.tsv").write_text("\n".join(tsv) + "\n")
    (root / "train.lbl").write_text("\n".join(lbl) + "\n")
    return [(c, labels) for c, labels, seconds in entries if seconds * SR >= 10_000]


def class_folders_tree(root: Path, classes=("bird", "car"), per_class=3, splits=False) -> None:
    for c, name in enumerate(classes):
        for k in range(per_class):
            split_dir = root / ("train" if k else "test") if splits else root
            write_tone(split_dir / name / f"{name}{k}.flac", 500 + 200 * c)


class CorruptFolder(builders.AudioFolder, skip_registration=True):
    """``class_folders_tree`` with clip car1 undecodable once prepared, as bit rot in a
    prepared dataset would leave it."""

    name = "corrupt_folder"

    def _convert(self, ref):
        if ref.clip_id.endswith("car1.flac"):
            return b"garbage bytes, not FLAC" * 4, 8000
        return super()._convert(ref)


def labels_csv_tree(root: Path) -> dict[str, set[str]]:
    rows = {"a.wav": {"x"}, "b.wav": {"x", "y"}, "sub/c.wav": {"z"}}
    root.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(rows):
        write_tone(root / path, 300 + 100 * i)
    with open(root / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "labels", "split"])
        for path, labels in rows.items():
            writer.writerow(
                [path, ";".join(sorted(labels)), "test" if path == "a.wav" else "train"]
            )
    return rows


def bad_files_tree(root: Path) -> dict[str, str]:
    """A class folder tree mixing good files with every kind of bad one.

    Returns file name → "good" or the reason it must be skipped with.
    """
    folder = root / "mixed"
    expected = {}
    write_tone(folder / "plain.wav", 440)
    write_tone(folder / "stereo.wav", 440, channels=2)
    write_tone(folder / "wrong_rate.wav", 440, rate=22_050)
    write_tone(folder / "very_long.flac", 440, seconds=95.0)
    # Taken because they decode, whatever their names say: AIFF, Ogg Vorbis and Opus,
    # and a WAV without an extension.
    for name in ("tone.aiff", "tone.ogg", "tone.opus"):
        write_tone(folder / name, 440)
    (folder / "no_extension").write_bytes((folder / "plain.wav").read_bytes())
    (folder / ".hidden.wav").write_bytes((folder / "plain.wav").read_bytes())  # never listed
    good = ["plain.wav", "stereo.wav", "wrong_rate.wav", "very_long.flac", "tone.aiff"]
    expected.update(dict.fromkeys([*good, "tone.ogg", "tone.opus", "no_extension"], "good"))
    (folder / "empty.wav").write_bytes(b"")
    (folder / "not_audio.wav").write_text("definitely not audio\n" * 50)
    (folder / "notes.txt").write_text("recorded on the 3rd\n")
    full = (folder / "plain.wav").read_bytes()
    (folder / "truncated.wav").write_bytes(full[:30])  # cut inside the header
    sf.write(folder / "nan.wav", np.full(SR, np.nan, np.float32), SR, subtype="FLOAT")
    sf.write(folder / "too_short.wav", np.zeros(100, np.float32), SR)
    expected.update(
        {
            "empty.wav": "unreadable",
            "not_audio.wav": "unreadable",
            "notes.txt": "unreadable",
            "truncated.wav": "unreadable",
            "nan.wav": "non_finite",
            "too_short.wav": "too_short",
        }
    )
    write_tone(root / "other" / "fine.wav", 880)
    expected["fine.wav"] = "good"
    return expected


def event_sound(class_index: int, seconds: float) -> np.ndarray:
    """``seconds`` of consecutive synthetic clips of one class (seeds 1000, 1001, ...)."""
    size = int(seconds * SR)
    clips, total = [], 0
    while total < size:
        clips.append(synthetic.clip(class_index, 1000 + len(clips)))
        total += clips[-1].size
    return np.concatenate(clips)[:size]


def event_recording(path: Path, seconds: float, events, floor_db: float = -80.0) -> Path:
    """A mono 16 kHz recording of faint noise (``floor_db`` RMS) with synthetic sound
    events ``[(class index, start s, end s)]``, written 10 s at a time."""
    rng = np.random.default_rng(7)
    sounds = [(int(begin * SR), event_sound(c, end - begin)) for c, begin, end in events]
    total = int(seconds * SR)
    with sf.SoundFile(path, "w", SR, 1, subtype="PCM_16") as f:
        for start in range(0, total, 10 * SR):
            block = rng.standard_normal(min(10 * SR, total - start)) * 10 ** (floor_db / 20)
            for begin, sound in sounds:
                lo, hi = max(begin, start), min(begin + sound.size, start + block.size)
                if lo < hi:
                    block[lo - start : hi - start] = sound[lo - begin : hi - begin]
            f.write(block.astype(np.float32))
    return path
