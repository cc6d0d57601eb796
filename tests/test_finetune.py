"""Fine-tuning runs: every recipe on 8 devices, loading encoders, the tools, ESC-50 folds."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as sk_metrics

from asda_jax import (
    audio,
    checkpoints,
    config_lib,
    evaluation,
    hardware,
    inference,
    metrics,
    report,
    sharding,
    train_lib,
)
from asda_jax.data import datasets
from asda_jax.testing import fixtures as fx
from tests import train_helpers as th

TINY = {
    "model.preset": "tiny",
    "data.batch_size": 8,
    "eval_data.batch_size": 8,
    "data.target_frames": 64,
    "eval_data.target_frames": 64,
    "data.threads": 1,
    "eval_data.threads": 1,
    "num_train_steps": 2,
    "optim.warmup_steps": 1,
    "log_every": 1,
    "checkpoint_every": 2,
}


def configured(path: str, arg: str, **overrides):
    config = config_lib.load_file(path, arg)
    config.update_from_flattened_dict({**TINY, **overrides})
    return config


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Every dataset the recipes read, prepared from fixture trees."""
    root = tmp_path_factory.mktemp("ft")
    fx.audioset_segments_tree(root / "as")
    fx.esc50_tree(root / "esc")
    fx.speech_commands_tree(root / "spc")
    data = root / "data"
    datasets.prepare("audioset", data, source_dir=root / "as")
    datasets.prepare("esc50", data, source_dir=root / "esc")
    datasets.prepare("speech_commands_v2", data, source_dir=root / "spc")
    datasets.prepare("synthetic", data, clips_per_class=4)
    return data


@pytest.fixture(scope="module")
def pretrained(sources, tmp_path_factory):
    """A tiny pretraining run on the synthetic data (its workdir)."""
    workdir = tmp_path_factory.mktemp("pretrained")
    train_lib.train(th.tiny_config(str(sources), num_train_steps=2), workdir)
    return workdir


RECIPES = {  # the AudioSet fixture has no unbalanced_train
    "as20k": {},
    "as2m": {"data.split": "balanced_train"},
    "esc50": {},
    "spcv2": {},
}


@pytest.mark.train
@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_runs_two_steps_on_eight_devices(name, sources, tmp_path):
    config = configured(
        f"configs/finetune_{name}.py", f"mesh=cpu,data_dir={sources}", **RECIPES[name]
    )
    assert dict(config.mesh) == dict(sharding.DATA_PARALLEL)
    state, task, mesh = train_lib.train(config, tmp_path)
    assert mesh.devices.size == 8 and int(state.step) == 2
    assert sorted(th.losses(tmp_path)) == [1, 2]
    assert all(np.isfinite(v[0]) for v in th.losses(tmp_path).values())
    results = evaluation.final_evaluation(state, task, mesh, tmp_path)
    size = datasets.load(task.eval_cfg.dataset, sources).split_sizes[task.eval_cfg.split]
    assert results["num_clips"] == size  # every clip once, padding dropped
    one_device = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    params = jax.device_put(jax.device_get(state.params), jax.devices()[0])
    outputs, labels = evaluation.over_split(
        task.scores, {"s": params}, task.eval_cfg, task.forms, one_device
    )
    on_one = metrics.classification_metrics(outputs["s"], labels)
    assert results == pytest.approx(on_one, rel=1e-5)  # 8 devices evaluate as one does
    if task.ft_cfg.loss == "bce_per_label":
        assert 0 < results["mAP"] <= 1
    assert json.loads((tmp_path / "eval.json").read_text()) == results


def test_the_as2m_recipe_samples_by_weight_and_spc2_rolls():
    as2m = config_lib.load_file("configs/finetune_as2m.py", "mesh=cpu")
    spc = config_lib.load_file("configs/finetune_spcv2.py", "mesh=cpu")
    assert as2m.data.weighted_sampling and not as2m.eval_data.weighted_sampling
    assert spc.finetune.spec_noise_and_roll and spc.finetune.loss == "bce"
    assert spc.seed == 42 and spc.optim.lr == 2e-4 and spc.data.target_frames == 128


@pytest.mark.train
def test_fine_tuning_starts_from_the_pretrained_student_encoder(sources, pretrained, tmp_path):
    config = configured(
        "configs/finetune_demo.py",
        f"data_dir={sources},init_from={pretrained}",
        num_train_steps=0,
        **{"optim.warmup_steps": 0},
    )
    state, _, _ = train_lib.train(config, tmp_path)
    student = checkpoints.restore_params(
        pretrained, checkpoints.restore_target(state.params["encoder"]), ("encoder",)
    )  # params/encoder: the student, not the teacher
    for a, b in zip(
        jax.tree.leaves(state.params["encoder"]), jax.tree.leaves(student), strict=True
    ):
        np.testing.assert_array_equal(a, b)


@pytest.mark.train
def test_a_checkpoint_of_another_model_is_refused_with_the_mismatches(
    sources, pretrained, tmp_path
):
    config = configured(
        "configs/finetune_demo.py", f"data_dir={sources},init_from={pretrained}", num_train_steps=1
    )
    config.model.preset = "demo"
    with pytest.raises(checkpoints.CheckpointMismatch, match=r"shape mismatches.*blocks_0"):
        train_lib.train(config, tmp_path)
    missing = configured("configs/finetune_demo.py", f"data_dir={sources},init_from={tmp_path}/x")
    with pytest.raises(config_lib.ConfigError, match="neither an export"):
        config_lib.validate(missing, chip=hardware.HOST, device_count=8, process_count=1)


@pytest.mark.train
def test_linear_probe_trains_the_head_only(sources, pretrained, tmp_path):
    config = configured(
        "configs/finetune_demo.py",
        f"data_dir={sources},init_from={pretrained},task=linear_probe",
    )
    state, _, _ = train_lib.train(config, tmp_path)
    start = checkpoints.restore_params(
        pretrained, checkpoints.restore_target(state.params["encoder"]), ("encoder",)
    )
    for a, b in zip(jax.tree.leaves(state.params["encoder"]), jax.tree.leaves(start), strict=True):
        np.testing.assert_array_equal(a, b)
    initial = th.task_on_cpu(config).init_params(jax.random.PRNGKey(config.seed))
    head = np.asarray(nn.meta.unbox(initial)["head"]["kernel"])
    assert np.abs(np.asarray(state.params["head"]["kernel"]) - head).max() > 1e-4


@pytest.mark.subprocess
def test_esc50_runner_reports_every_fold_and_their_mean(sources, tmp_path):
    flags = [f"--config.{k}={v}" for k, v in TINY.items() if not k.startswith("eval_data.")]
    command = [
        sys.executable,
        str(th.ROOT / "launch" / "esc50_folds.py"),
        f"--config=configs/finetune_esc50.py:mesh=cpu,data_dir={sources}",
        f"--workdir={tmp_path}",
        *flags,
        "--config.eval_data.batch_size=8",
        "--config.eval_data.target_frames=64",
        "--config.num_train_steps=1",
        "--config.checkpoint_every=1",
    ]
    done = subprocess.run(command, cwd=th.ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "folds.json").read_text())
    accuracies = [summary["folds"][f"fold{k}"] for k in range(1, 6)]
    assert summary["mean"] == pytest.approx(np.mean(accuracies))
    assert summary["std"] == pytest.approx(np.std(accuracies))
    for k in range(1, 6):  # each fold held out its own two clips
        fold = json.loads((tmp_path / f"fold{k}" / "eval.json").read_text())
        assert fold["num_clips"] == 2 and fold["accuracy"] == summary["folds"][f"fold{k}"]
    assert "mean" not in done.stderr and "± " in done.stdout


@pytest.mark.subprocess
def test_sigterm_during_an_esc50_fold_leaves_it_saved_and_unfinished(sources, tmp_path):
    """One process of an 8-task SLURM allocation (a batch script) starts as train.py
    would; SIGTERM mid-fold saves it, and nothing evaluates or summarises it."""
    flags = [f"--config.{k}={v}" for k, v in TINY.items() if not k.startswith("eval_data.")]
    command = [
        sys.executable, str(th.ROOT / "launch" / "esc50_folds.py"),
        f"--config=configs/finetune_esc50.py:mesh=cpu,data_dir={sources}",
        f"--workdir={tmp_path}", "--folds=1", *flags, "--config.num_train_steps=100000",
        "--config.checkpoint_every=100000",
    ]  # fmt: skip
    env = {**os.environ, "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "1", "SLURM_JOB_ID": "7"}
    proc = subprocess.Popen(
        command, cwd=th.ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 600
    while not th.losses(tmp_path / "fold1"):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "fold 1 stopped before its last step" in out and "accuracy" not in out
    saved = checkpoints.Checkpoints(tmp_path / "fold1").all_steps()
    assert len(saved) == 1 and 0 < saved[0] < 100000
    assert not (tmp_path / "fold1" / "eval.json").exists()
    assert not (tmp_path / "folds.json").exists()


@pytest.fixture(scope="module")
def finetuned(sources, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("finetuned")
    config = configured("configs/finetune_demo.py", f"data_dir={sources},init_from=")
    state, task, mesh = train_lib.train(config, workdir)
    evaluation.final_evaluation(state, task, mesh, workdir)
    return workdir


def run_tool(name: str, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(th.ROOT / "launch" / f"{name}.py"), *args]
    return subprocess.run(command, cwd=th.ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.subprocess
def test_extract_writes_the_encoder_outputs_and_skips_bad_files(finetuned, tmp_path):
    clips = tmp_path / "clips"
    fx.write_tone(clips / "a.wav", 440, seconds=1.3)
    fx.write_tone(clips / "sub" / "b.flac", 880, seconds=0.7, rate=44_100)
    fx.write_tone(clips / "c.aiff", 660, seconds=0.5)  # taken because they decode
    fx.write_tone(clips / "d.ogg", 550, seconds=0.5, rate=22_050)
    (clips / "broken.wav").write_text("not audio")
    (clips / "empty.ogg").write_bytes(b"")
    (clips / "notes.txt").write_text("tones")
    done = run_tool(
        "extract", f"--checkpoint={finetuned}", f"--audio={clips}", f"--output={tmp_path}/out"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "4 of 7 files done, 3 skipped" in done.stdout
    assert all(name in done.stderr for name in ("broken.wav", "empty.ogg", "notes.txt"))
    assert "extract: 7/7 files [" in done.stderr  # progress, as plain lines off a terminal
    for stem in ("c", "d"):
        assert np.load(tmp_path / "out" / f"{stem}.windows.npy").shape[0] == 1
    encode, cfg, _, inputs = inference.load_encoder(finetuned)
    assert inputs.target_frames == 64  # the run's input length: the windows
    assert inputs.norm == audio.NORM_STATS["audioset"]  # and its normalisation
    for stem, seconds in (("a", 1.3), ("sub/b", 0.7)):  # 128 and 68 frames: two windows
        utterance = np.load(tmp_path / "out" / f"{stem}.utterance.npy")
        steps = np.load(tmp_path / "out" / f"{stem}.frames.npy")
        count = -(-(int(seconds * 100) - 2) // 16)
        assert utterance.shape == (cfg.embed_dim,)
        assert steps.shape == (count, cfg.freq_patches * cfg.embed_dim)
        assert np.load(tmp_path / "out" / f"{stem}.frame_times_ms.npy").shape == (count,)
        assert np.load(tmp_path / "out" / f"{stem}.window_spans.npy").shape == (2, 2)
    # Each window is what its 64 frames give alone; the utterance is their mean (64 real
    # frames each), the frames their patch outputs one after the other. The reference
    # cuts the whole clip's fbank; each window's own fbank differs by float rounding.
    wave = audio.read_audio(clips / "a.wav")
    spec, _ = audio.spectrogram(wave, 128, (-4.268, 4.569))
    tokens = np.asarray(encode(jnp.stack([spec[:64], spec[64:]])))
    np.testing.assert_allclose(
        np.load(tmp_path / "out" / "a.utterance.npy"), tokens[:, 0].mean(0), atol=1e-4
    )
    np.testing.assert_allclose(
        np.load(tmp_path / "out" / "a.frames.npy").reshape(-1, cfg.embed_dim),
        tokens[:, 1:].reshape(-1, cfg.embed_dim),
        atol=1e-4,
    )
    assert (
        run_tool("extract", f"--checkpoint={tmp_path}", "--audio=x", "--output=y").returncode == 2
    )


@pytest.mark.subprocess
def test_infer_prints_top_labels_with_display_names(finetuned, sources, tmp_path):
    path = fx.write_tone(tmp_path / "tone.wav", 440, seconds=0.6)  # fits one 64-frame window
    names = datasets.load("synthetic", sources).class_names
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "index,mid,display_name\n"
        + "".join(f'{i},/m/{i},"Nice {n}"\n' for i, n in enumerate(names))
    )
    done = run_tool(
        "infer", f"--checkpoint={finetuned}", f"--audio={path}", f"--labels={labels}", "--top_k=3"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith(str(path)))
    shown = line.split(": ", 1)[1].split("  ")
    assert len(shown) == 3 and all(s.startswith("Nice ") for s in shown)
    scores = [float(s.rsplit(" ", 1)[1]) for s in shown]
    assert scores == sorted(scores, reverse=True) and sum(scores) <= 1 + 1e-6  # softmax
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF")
    done = run_tool("infer", f"--checkpoint={finetuned}", f"--audio={bad}")
    assert done.returncode == 1 and "skipped" in done.stderr


@pytest.mark.subprocess
def test_eval_tool_recomputes_the_final_metrics(finetuned, tmp_path):
    done = run_tool("eval", f"--workdir={finetuned}", f"--output={tmp_path}/m.json")
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "m.json").read_text())
    final = json.loads((finetuned / "eval.json").read_text())
    assert metrics["split"] == "test" and metrics["num_clips"] == 10 == final["num_clips"]
    assert metrics["accuracy"] == pytest.approx(final["accuracy"])
    assert run_tool("eval", f"--workdir={tmp_path}").returncode == 2  # not a run


@pytest.fixture(scope="module")
def synthetic_60(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic60")
    datasets.prepare("synthetic", root, clips_per_class=60)  # 480 train, 120 test clips
    return str(root)


@pytest.mark.train
def test_fine_tuning_from_the_pretrained_demo_beats_random_init(synthetic_60, tmp_path):
    """The demo recipe with a third of its budget: 100 pretraining steps, then 60
    fine-tuning steps from the pretrained encoder and from random init (same seed, data
    and budget)."""
    steps = 100
    pretrain = config_lib.load_file("configs/demo.py")
    pretrain.update_from_flattened_dict(
        {
            "data.data_dir": synthetic_60, "num_train_steps": steps, "optim.warmup_steps": 10,
            "pretrain.ema_anneal_end_step": steps,
            "checkpoint_every": steps,
        },
    )  # fmt: skip
    train_lib.train(pretrain, tmp_path / "pretrain")
    accuracy = {}
    for name, init_from in (("pretrained", tmp_path / "pretrain"), ("random", "")):
        config = config_lib.load_file(
            "configs/finetune_demo.py", f"data_dir={synthetic_60},init_from={init_from}"
        )
        config.num_train_steps = config.checkpoint_every = 60
        state, task, mesh = train_lib.train(config, tmp_path / name)
        results = evaluation.final_evaluation(state, task, mesh, tmp_path / name)
        accuracy[name] = results["accuracy"]
    print(accuracy)
    assert accuracy["pretrained"] >= accuracy["random"] + 0.05, accuracy  # 35 % vs 25 % here


def png_size(path) -> tuple[int, int]:
    """(width, height) of a PNG, from its header (and the file opens as an image)."""
    with Image.open(path) as image:
        image.verify()
        assert image.format == "PNG"
        return image.size


def test_a_fine_tuning_report_shows_the_run_and_scores_each_class_as_sklearn_does(finetuned):
    page = report.write(finetuned)
    folder = finetuned / report.REPORT_DIR
    text = page.read_text()
    for picture in ("curves.png", "per_class.png", "confusion.png"):
        assert f"]({picture})" in text
        width, height = png_size(folder / picture)
        assert width >= 600 and height >= 200
    scores, targets, names = report.read_predictions(finetuned / report.PREDICTIONS_FILE)
    assert report.is_single_label(targets) and scores.shape == (targets.shape[0], len(names))
    true, predicted = targets.argmax(1), scores.argmax(1)
    assert names == inference.class_names(inference.load_classifier(finetuned).input)
    rows = list(csv.DictReader((folder / "per_class.csv").open()))
    assert [r["class"] for r in rows] == names
    present = np.flatnonzero(np.bincount(true, minlength=len(names)) > 0)
    precision, recall, f1, support = sk_metrics.precision_recall_fscore_support(
        true, predicted, labels=present, zero_division=0
    )
    for i, c in enumerate(present):
        got = rows[c]
        assert float(got["precision"]) == pytest.approx(precision[i], abs=1e-12)
        assert float(got["recall"]) == pytest.approx(recall[i], abs=1e-12)
        assert float(got["F1"]) == pytest.approx(f1[i], abs=1e-12)
        assert float(got["clips"]) == support[i]
    absent = sorted(set(range(len(names))) - set(present))
    assert all(np.isnan(float(rows[c]["recall"])) for c in absent)


def test_multi_label_per_class_scores_are_sklearns_average_precision(tmp_path):
    rng = np.random.default_rng(0)
    targets = (rng.random((40, 6)) < 0.3).astype(np.float64)
    targets[:, 5] = 0  # a class with no positive clip: no AP, left out of the mean
    scores = np.round(rng.random((40, 6)), 2)  # ties, as the AP's steps must take them
    names = [f"class {c}" for c in range(6)]
    report.write_predictions(tmp_path / report.PREDICTIONS_FILE, scores, targets, names)
    page = report.write(tmp_path).read_text()
    rows = list(csv.DictReader((tmp_path / report.REPORT_DIR / "per_class.csv").open()))
    for c in range(5):
        want = sk_metrics.average_precision_score(targets[:, c], scores[:, c])
        assert float(rows[c]["AP"]) == pytest.approx(want, abs=1e-12)
    assert np.isnan(float(rows[5]["AP"])) and "No clip of 1 classes in this split: class 5" in page
    assert "confusion" not in page  # multi-label: no confusion matrix
    assert png_size(tmp_path / report.REPORT_DIR / "per_class.png")[0] >= 600


@pytest.mark.subprocess
def test_infer_draws_a_recording_of_several_minutes(finetuned, tmp_path):
    long = tmp_path / "clips" / "four_minutes.wav"
    fx.write_tone(long, 440, seconds=240.0, rate=22_050)
    png = tmp_path / "pictures" / "four_minutes.png"
    done = run_tool("infer", f"--checkpoint={finetuned}", f"--audio={long}", f"--plot={png}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert png_size(png) == (1200, 750)  # plots.recording's 12 × 7.5 inches at 100 dpi
    spectrogram = audio.log_mel_overview(long, max_columns=2000)
    assert spectrogram.shape == (2000, 128)  # 24 000 frames, 12 a column
    fx.write_tone(long.parent / "short.wav", 880, seconds=1.0)
    refused = run_tool("infer", f"--checkpoint={finetuned}", f"--audio={long.parent}",
                       f"--plot={png}")  # fmt: skip
    assert refused.returncode == 2 and "names a folder, not a .png" in refused.stderr


@pytest.mark.subprocess
def test_a_classifiers_export_names_its_classes_wherever_it_is_used(finetuned, tmp_path):
    """An export carries no dataset; its model.json holds the class names, so infer.py
    names the classes with neither the run's dataset nor --labels."""
    export = tmp_path / "export"
    done = run_tool("export", f"--workdir={finetuned}", f"--output={export}")
    assert done.returncode == 0, done.stderr[-3000:]
    names = inference.class_names(inference.load_classifier(finetuned).input)
    assert json.loads((export / "model.json").read_text())["class_names"] == names
    assert inference.describe(export).input.dataset is None
    fx.write_tone(tmp_path / "clip.wav", 440, seconds=1.0)
    labelled = run_tool("infer", f"--checkpoint={export}", f"--audio={tmp_path / 'clip.wav'}")
    assert labelled.returncode == 0, labelled.stderr[-3000:]
    line = labelled.stdout.splitlines()[0].split(": ", 1)[1]  # "<file>: name score  name ..."
    shown = line.split("(")[0].split()[0::2]
    assert len(shown) == 5 and set(shown) <= set(names)
