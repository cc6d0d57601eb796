"""Linear probes on labelled folders with held-out sources (asda_jax/file_probe.py,
launch/probe.py) and the sound-bank readers the real-audio benchmark labels notes with."""

import collections
import fcntl
import io
import json
import os
import struct
import subprocess
import sys
import termios

import jax.numpy as jnp
import numpy as np
import pytest

from asda_jax import audio, embeddings, file_probe, inference, probe, progress, train_lib
from asda_jax import model as model_lib
from asda_jax.data import datasets
from asda_jax.testing import fixtures as fx
from benchmarks import sound_banks
from tests import train_helpers as th

NORM = audio.NORM_STATS["audioset"]


def labelled(rows):
    return [
        file_probe.LabelledFile(f"{i}.wav", label, group) for i, (label, group) in enumerate(rows)
    ]


# ---------------------------------------------------------------------------- folds


def test_each_group_is_held_out_once_and_never_trained_on_in_its_fold():
    rng = np.random.default_rng(0)
    files = labelled(
        zip(rng.choice(list("abcd"), 60), rng.choice(["x", "y", "z"], 60), strict=True)
    )
    folds = file_probe.held_out_folds(files)
    assert [f.name for f in folds] == ["x", "y", "z"]
    tested = collections.Counter()
    for fold in folds:
        train_groups = {files[i].group for i in fold.train}
        test_groups = {files[i].group for i in fold.test}
        assert test_groups == {fold.name} and fold.name not in train_groups
        assert sorted([*fold.train, *fold.test]) == list(range(60))  # each file once per fold
        tested.update(fold.test.tolist())
    assert tested == collections.Counter(range(60))  # and in exactly one fold's test part


def test_without_groups_each_class_is_dealt_over_the_folds():
    files = labelled([("a", "")] * 10 + [("b", "")] * 7)
    folds = file_probe.held_out_folds(files, k=5)
    assert len(folds) == 5
    assert sorted(np.concatenate([f.test for f in folds]).tolist()) == list(range(17))
    for fold in folds:
        assert sorted([*fold.train, *fold.test]) == list(range(17))
        assert sum(files[i].label == "a" for i in fold.test) == 2  # 10 over 5 folds


@pytest.mark.parametrize(
    "rows, problem",
    [([("a", "x"), ("b", "")], "a group for every file"), ([("a", "x"), ("b", "x")], "two groups")],
)
def test_folds_refuse_groups_that_cannot_be_held_out(rows, problem):
    with pytest.raises(ValueError, match=problem):
        file_probe.held_out_folds(labelled(rows))


# ---------------------------------------------------------------------------- the probe


def test_balanced_accuracy_weighs_every_class_alike():
    true = np.array([0] * 8 + [1] * 2)
    assert probe.balanced_accuracy(true, np.zeros(10, int)) == 0.5  # the majority guess
    assert probe.balanced_accuracy(true, true) == 1.0
    predicted = np.array([0] * 6 + [1] * 2 + [1, 0])
    assert probe.balanced_accuracy(true, predicted) == pytest.approx((6 / 8 + 1 / 2) / 2)


def test_the_probe_scores_features_of_the_class_not_features_of_the_source():
    """Features that only name the source score chance on a held-out source; features
    that carry the class beside the source's signature score near 1."""
    rng = np.random.default_rng(1)
    classes, groups = np.array(list("abc")), np.array(["x", "y", "z"])
    label_ids, group_ids = rng.integers(0, 3, 300), rng.integers(0, 3, 300)
    files = labelled(zip(classes[label_ids], groups[group_ids], strict=True))
    folds = file_probe.held_out_folds(files)
    offset = np.concatenate([np.zeros((3, 8)), 3.0 * rng.standard_normal((3, 8))], axis=1)
    of_class = np.eye(3)[label_ids] @ np.concatenate(
        [rng.standard_normal((3, 8)), np.zeros((3, 8))], 1
    )
    noise = 0.3 * rng.standard_normal((300, 16))
    good = file_probe.run(of_class + offset[group_ids] + noise, files, folds)
    source_only = file_probe.run(offset[group_ids] + noise, files, folds)
    assert good.mean > 0.95 and set(good.per_fold) == {"x", "y", "z"}
    assert abs(source_only.mean - 1 / 3) < 0.12
    assert set(good.penalties.values()) <= set(file_probe.PENALTIES)
    table = file_probe.table({"good": good, "source": source_only}, ["x", "y", "z"])
    assert table.splitlines()[0] == "| features | x | y | z | mean | spread |"
    assert f"| good | {good.per_fold['x']:.3f} |" in table


def test_two_sources_probe_each_other_with_the_penalty_chosen_inside_one():
    rng = np.random.default_rng(4)
    label_ids = rng.integers(0, 2, 60)
    files = labelled(zip(np.array(["a", "b"])[label_ids], ["x"] * 30 + ["y"] * 30, strict=True))
    features = np.eye(2)[label_ids] + 0.3 * rng.standard_normal((60, 2))
    result = file_probe.run(features, files, file_probe.held_out_folds(files))
    assert set(result.per_fold) == {"x", "y"} and result.mean > 0.9
    assert set(result.penalties.values()) <= set(file_probe.PENALTIES)


def test_effective_rank_counts_the_directions_features_spread_over():
    rng = np.random.default_rng(6)
    line = rng.standard_normal((100, 1)) * rng.standard_normal((1, 8))
    assert file_probe.effective_rank(line) == pytest.approx(1.0, abs=1e-3)
    even = np.linalg.qr(rng.standard_normal((100, 8)))[0] * 10  # orthonormal columns
    assert file_probe.effective_rank(even - even.mean(0)) == pytest.approx(8.0, rel=0.05)


def test_ridge_accuracy_of_the_demo_probe_is_the_ridge_predictions_argmax():
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((40, 5)), np.eye(3)[rng.integers(0, 3, 40)]
    scores = probe.ridge_predictions(x[:30], y[:30], x[30:], l2=0.5)
    assert scores.shape == (10, 3)
    expected = np.mean(scores.argmax(1) == y[30:].argmax(1))
    assert probe.ridge_accuracy(x[:30], y[:30], x[30:], y[30:], l2=0.5) == expected


# ---------------------------------------------------------------------------- reading


def test_a_labels_csv_and_class_folders_list_the_same_files(tmp_path):
    for label, freq in (("low", 220), ("high", 1760)):
        for k in range(2):
            fx.write_tone(tmp_path / "folders" / label / f"{k}.flac", freq + k)
    from_folders = file_probe.read_labelled_folder(tmp_path / "folders")
    assert [(f.label, f.group) for f in from_folders] == [("high", "")] * 2 + [("low", "")] * 2
    rows = "\n".join(
        f"{label}/{k}.flac,{label},bank{k}" for label in ("high", "low") for k in (0, 1)
    )
    (tmp_path / "folders" / "labels.csv").write_text("path,label,group\n" + rows + "\n")
    from_csv = file_probe.read_labelled_folder(tmp_path / "folders")
    assert [f.path for f in from_csv] == [f.path for f in from_folders]
    assert [f.group for f in from_csv] == ["bank0", "bank1"] * 2
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "labels.csv").write_text("file,class\nx.wav,a\n")
    with pytest.raises(ValueError, match="path,label"):
        file_probe.read_labelled_folder(tmp_path / "bad")
    with pytest.raises(FileNotFoundError):
        file_probe.read_labelled_folder(tmp_path / "missing")


def test_unreadable_files_are_skipped_and_counted_and_the_rest_read(tmp_path):
    expected = fx.bad_files_tree(tmp_path / "tree")
    files = file_probe.read_labelled_folder(tmp_path / "tree")
    waves, kept, skipped = file_probe.read_waves(files)
    names = [files[i].path.split("/")[-1] for i in kept]
    assert sorted(names) == sorted(n for n, status in expected.items() if status == "good")
    reasons = collections.Counter(s for s in expected.values() if s != "good")
    assert skipped == reasons and len(waves) == len(kept)
    long = names.index("very_long.flac")
    assert waves[long].size == 30 * audio.SAMPLE_RATE  # read up to max_seconds


def test_logmel_statistics_are_each_bands_mean_spread_maximum_and_change():
    rng = np.random.default_rng(3)
    tone = 0.3 * np.sin(2 * np.pi * 1000 * np.arange(16_000) / 16_000)
    noise = 0.1 * rng.standard_normal(8_000)
    stats = file_probe.logmel_statistics([tone.astype(np.float32), noise.astype(np.float32)])
    assert stats.shape == (2, 4 * 128)
    spec = audio.fbank(noise.astype(np.float32))
    mean, std, peak, change = np.split(stats[1], 4)
    np.testing.assert_allclose(mean, spec.mean(0), rtol=1e-5)
    np.testing.assert_allclose(peak, spec.max(0), rtol=1e-5)
    np.testing.assert_allclose(change, np.diff(spec, axis=0).std(0), rtol=1e-4, atol=1e-5)
    assert np.argmax(np.split(stats[0], 4)[0]) == np.argmax(audio.fbank(tone).mean(0))
    assert np.all(std >= 0) and np.split(stats[0], 4)[3].max() < 1.0  # a steady tone


# ---------------------------------------------------------------------------- encoders


def test_encoder_features_are_the_mean_of_the_real_patch_outputs_or_the_cls(encoder_export):
    loaded = inference.load_encoder(encoder_export)
    rng = np.random.default_rng(4)
    waves = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (8_000, 12_000, 30_000)]
    mean = file_probe.encoder_features(loaded, waves)
    cls = file_probe.encoder_features(loaded, waves, pooling="cls")
    assert mean.shape == cls.shape == (3, loaded.cfg.embed_dim)
    # One window (0.5 s: 48 frames, 3 time steps): its real patch outputs, averaged.
    spec, frames = audio.spectrogram(waves[0] - waves[0].mean(), 48, NORM)
    tokens = np.asarray(loaded.encode(jnp.asarray(spec[None]), jnp.asarray([frames])))
    np.testing.assert_allclose(mean[0], tokens[0, 1:].mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(cls[0], tokens[0, 0], rtol=1e-4, atol=1e-5)
    out = embeddings.embed_clips(embeddings.Embedder(loaded), waves[2:])
    np.testing.assert_allclose(cls[2], out.scene[0], rtol=1e-5)


def test_a_random_encoder_has_the_architecture_and_input_and_other_values(encoder_export):
    trained, random = (
        inference.load_encoder(encoder_export),
        inference.random_encoder(encoder_export, 1),
    )
    assert random.cfg == trained.cfg and random.input == trained.input
    spec = jnp.ones((1, 128, 128))
    assert random.encode(spec).shape == trained.encode(spec).shape
    assert not np.allclose(random.encode(spec), trained.encode(spec))
    again = inference.random_encoder(encoder_export, 1)
    np.testing.assert_array_equal(again.encode(spec), random.encode(spec))


@pytest.mark.train
def test_a_pretraining_workdirs_teacher_loads_as_an_encoder(tmp_path):
    datasets.prepare("synthetic", tmp_path / "data", clips_per_class=4)
    config = th.tiny_config(str(tmp_path / "data"), num_train_steps=2, probe=None)
    state, _, _ = train_lib.train(config, tmp_path / "run")
    spec = jnp.asarray(np.random.default_rng(7).standard_normal((1, 64, 128)), jnp.float32)
    for which, params in (("encoder", state.params["encoder"]), ("teacher", state.teacher)):
        loaded = inference.load_encoder(tmp_path / "run", which=which)
        expected = model_lib.Encoder(loaded.cfg).apply({"params": params}, spec).tokens
        np.testing.assert_allclose(loaded.encode(spec), expected, rtol=1e-5, atol=1e-5)
    student = inference.load_encoder(tmp_path / "run").encode(spec)
    assert not np.allclose(
        student, inference.load_encoder(tmp_path / "run", which="teacher").encode(spec)
    )


@pytest.mark.subprocess
def test_the_probe_tool_prints_and_writes_every_feature_set(encoder_export, tmp_path):
    rows = []
    for bank, shift in (("one", 0), ("two", 30), ("three", 60)):
        for label, freq in (("low", 200), ("high", 2000)):
            for k in range(3):
                fx.write_tone(tmp_path / "notes" / bank / f"{label}{k}.wav", freq + shift + 10 * k)
                rows.append(f"{bank}/{label}{k}.wav,{label},{bank}")
    (tmp_path / "notes" / "broken.wav").write_text("not audio")
    rows.append("broken.wav,low,one")
    (tmp_path / "notes" / "labels.csv").write_text("path,label,group\n" + "\n".join(rows) + "\n")
    out = tmp_path / "probe.json"
    command = [sys.executable, "launch/probe.py", f"--labels={tmp_path / 'notes'}"]
    command += [f"--checkpoint={encoder_export}", "--random_init", "--logmel", f"--output={out}"]
    done = subprocess.run(command, cwd=th.ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "18 files, 3 folds; skipped {'unreadable': 1}" in done.stdout
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"log-mel statistics", str(encoder_export), "random init"}
    logmel = report["results"]["log-mel statistics"]
    assert set(logmel["per_fold"]) == {"one", "two", "three"}
    assert logmel["mean"] == 1.0  # a low and a high tone, whatever the bank
    missing = subprocess.run([*command[:2], f"--labels={tmp_path / 'none'}", "--logmel"],
                             cwd=th.ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert missing.returncode == 2 and "no such folder" in missing.stderr
    two = [row for row in rows if row.endswith((",one", ",two"))]  # a folder of two sources
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "labels.csv").write_text(
        "path,label,group\n" + "\n".join(f"../notes/{row}" for row in two) + "\n"
    )
    both = subprocess.run([*command[:2], f"--labels={tmp_path / 'two'}", "--logmel"],
                          cwd=th.ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert both.returncode == 0, both.stderr[-3000:]
    assert (
        "12 files, 2 folds" in both.stdout
        and "| log-mel statistics | 1.000 | 1.000 |" in both.stdout
    )


# ---------------------------------------------------------------------------- sound banks


def riff(cid: bytes, payload: bytes) -> bytes:
    return cid + struct.pack("<I", len(payload)) + payload + b"\0" * (len(payload) & 1)


def tiny_soundfont(path, notes: dict[int, np.ndarray], rate: int = 22_050) -> None:
    """A SoundFont 2 with one preset per program (bank 0), each one instrument zone
    pointing at its own 16-bit sample, and one drum preset (bank 128)."""
    pcm, headers, phdr, pbag, pgen, inst, ibag, igen = b"", b"", b"", b"", b"", b"", b"", b""
    programs = sorted(notes)
    for k, program in enumerate([*programs, 0]):  # the last: drums, on the first sample
        wave = notes[programs[min(k, len(programs) - 1)]]
        if k < len(programs):
            start = len(pcm) // 2
            pcm += (wave * 32767).astype("<i2").tobytes() + bytes(92)  # 46 zero samples
            end = start + wave.size
            name = f"s{program}".encode()
            header = (name, start, end, start, end, rate, 60, 0, 0, sound_banks.SAMPLE_MONO)
            headers += struct.pack("<20sIIIIIBbHH", *header)
        bank = 128 if k == len(programs) else 0
        phdr += struct.pack("<20sHHHIII", b"p", program, bank, k, 0, 0, 0)
        pbag += struct.pack("<HH", k, 0)
        pgen += struct.pack("<HH", sound_banks.GEN_INSTRUMENT, min(k, len(programs) - 1))
    for k in range(len(programs)):
        inst += struct.pack("<20sH", b"i", k)
        ibag += struct.pack("<HH", k, 0)
        igen += struct.pack("<HH", sound_banks.GEN_SAMPLE_ID, k)
    n = len(programs)
    phdr += struct.pack("<20sHHHIII", b"EOP", 0, 0, n + 1, 0, 0, 0)
    pbag += struct.pack("<HH", n + 1, 0)
    inst += struct.pack("<20sH", b"EOI", n)
    ibag += struct.pack("<HH", n, 0)
    headers += struct.pack("<20sIIIIIBbHH", b"EOS", 0, 0, 0, 0, 0, 0, 0, 0, 0)
    pdta = b"pdta" + b"".join(
        riff(cid, data) for cid, data in ((b"phdr", phdr), (b"pbag", pbag), (b"pmod", bytes(10)),
                                          (b"pgen", pgen + bytes(4)), (b"inst", inst),
                                          (b"ibag", ibag), (b"imod", bytes(10)),
                                          (b"igen", igen + bytes(4)), (b"shdr", headers))
    )  # fmt: skip
    body = b"sfbk" + riff(b"LIST", b"INFO") + riff(b"LIST", b"sdta" + riff(b"smpl", pcm))
    path.write_bytes(riff(b"RIFF", body + riff(b"LIST", pdta)))


def test_soundfont_notes_are_the_stored_samples_labelled_by_family(tmp_path):
    rng = np.random.default_rng(5)
    notes = {0: rng.uniform(-0.5, 0.5, 300), 41: rng.uniform(-0.5, 0.5, 200)}  # piano, strings
    tiny_soundfont(tmp_path / "bank.sf2", notes)
    read = sound_banks.sf2_notes(tmp_path / "bank.sf2")
    assert [(n.program, n.family, n.rate) for n in read] == [
        (0, "piano", 22_050),
        (41, "strings", 22_050),
    ]
    for note, program in zip(read, (0, 41), strict=True):
        # A looped sample is held to NOTE_SECONDS by repeating its loop (here: all of it).
        length = round(sound_banks.NOTE_SECONDS * 22_050)
        expected = np.resize((notes[program] * 32767).astype(np.int16) / 32768.0, length)
        np.testing.assert_allclose(note.wave, expected, atol=1e-6)
    with pytest.raises(ValueError, match="SoundFont"):
        (tmp_path / "not.sf2").write_bytes(b"RIFF\0\0\0\0WAVE")
        sound_banks.sf2_notes(tmp_path / "not.sf2")


def test_gus_patch_notes_are_decoded_from_every_sample_format(tmp_path):
    waves = []
    body = b""
    for modes, kind in ((1, "<i2"), (0, "i1"), (3, "<u2"), (2, "u1")):  # 16/8-bit, (un)signed
        wide, unsigned = modes & 1, modes & 2
        full = 32768 if wide else 128
        values = np.arange(-full, full, full // 4)
        waves.append(values / full)
        raw = (values + (full if unsigned else 0)).astype(kind).tobytes()
        header = sound_banks.WAVE_HEADER.pack(b"w", 0, len(raw), 0, 0, 8000, 0, 0, 0, 0, 0,
                                              bytes(6), bytes(6), 0, 0, 0, 0, 0, 0, modes, 0, 0,
                                              bytes(36))  # fmt: skip
        body += header + raw
    head = bytearray(sound_banks.PAT_HEADER_BYTES)
    head[:12] = sound_banks.PAT_MAGIC[0]
    struct.pack_into("<H", head, 85, len(waves))
    (tmp_path / "073_Flute.pat").write_bytes(bytes(head) + body)
    (tmp_path / "readme.txt").write_text("not a patch")
    notes = sound_banks.patch_folder_notes(tmp_path)
    assert [n.family for n in notes] == ["pipe"] * 4 and {n.rate for n in notes} == {8000}
    for note, wave in zip(notes, waves, strict=True):
        np.testing.assert_allclose(note.wave, wave, atol=1e-7)


# ---------------------------------------------------------------------------- progress


def test_progress_draws_a_bar_on_a_terminal_and_plain_lines_elsewhere():
    main, follower = os.openpty()  # a pseudo-terminal: isatty() is true of its far end
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 wide
    with os.fdopen(follower, "w") as terminal:
        shown = list(progress.progress(range(30), "read", unit="clips", stream=terminal))
    drawn = os.read(main, 1 << 16).decode()
    os.close(main)
    assert shown == list(range(30))
    assert "\r" in drawn and "read" in drawn and "30/30" in drawn and "clips/s" in drawn

    log = io.StringIO()  # not a terminal: a line each time ``every_s`` has passed
    items = iter(range(4))  # no len(): the total is given
    assert list(progress.progress(items, "read", total=4, stream=log, every_s=0)) == [0, 1, 2, 3]
    lines = log.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["1/4", "2/4", "3/4", "4/4"]
    assert all(line.startswith("read: ") and "files/s" in line for line in lines)
    assert "\r" not in log.getvalue()
    quiet = io.StringIO()  # the default: one line at the end of a short loop
    list(progress.progress(range(3), "read", stream=quiet))
    assert quiet.getvalue().count("\n") == 1 and "3/3 files" in quiet.getvalue()
