"""Runs, datasets and tools on Cloud Storage: every path a user names may be a gs:// URL.

The bucket is served by a GCS-API server on 127.0.0.1 (asda_jax/testing/gcs_server.py); each
test writes under a folder of its own.
"""

import json
import signal
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from asda_jax import audio, checkpoints, cli, embeddings, inference, storage, train_lib
from asda_jax.data import datasets
from asda_jax.testing import fixtures as fx
from tests import train_helpers as th
from tests.test_finetune import configured, run_tool
from tests.test_multihost import launch_pair, restore_on_one_device, wait_all
from tests.test_train import assert_same_losses


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    datasets.prepare("synthetic", root, clips_per_class=4)  # 30 train, 10 test clips
    return str(root)


def assert_no_url_folders(*roots: Path) -> None:
    """A URL taken for a local path leaves a folder named ``gs:`` behind."""
    for root in roots:
        assert not list(Path(root).rglob("gs:*")), f"a gs: folder under {root}"


def saved_steps(workdir: str) -> list[int]:
    return checkpoints.Checkpoints(workdir).all_steps()


def test_paths_are_absolute_or_urls_and_other_schemes_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.path("run") == storage.path(tmp_path / "run")
    assert str(storage.path("run")) == str(tmp_path / "run")
    assert str(storage.path("gs://b/run") / "x") == "gs://b/run/x"
    assert storage.is_remote("gs://b") and not storage.is_remote(tmp_path)
    for url in ("s3://b/run", "http://host/run"):
        with pytest.raises(ValueError, match="unsupported URL"):
            storage.path(url)


def test_a_stage_appends_to_what_the_bucket_holds_and_uploads_changes(gcs_bucket):
    target = f"{gcs_bucket}/stage"
    first = storage.Stage(target, pull=("log.txt",))
    (first.local / "log.txt").write_text("one\n")
    (first.local / "sub").mkdir()
    (first.local / "sub" / "events").write_bytes(b"\x00\x01")
    first.sync()
    assert storage.files_under(storage.path(target)) == ["log.txt", "sub/events"]
    with open(first.local / "log.txt", "a") as f:
        f.write("two\n")
    first.close()
    assert not Path(first.local).exists()
    resumed = storage.Stage(target, pull=("log.txt",))  # a fresh VM's empty disk
    with open(resumed.local / "log.txt", "a") as f:
        f.write("three\n")
    resumed.close()
    assert (storage.path(target) / "log.txt").read_text() == "one\ntwo\nthree\n"
    assert (storage.path(target) / "sub" / "events").read_bytes() == b"\x00\x01"
    local = storage.Stage(Path(first.local).parent / "plain")  # a local target: itself
    assert local.local == local.target and not local.remote


def test_audio_in_the_bucket_reads_as_the_local_file(gcs_bucket, tmp_path):
    local = fx.write_tone(tmp_path / "clips" / "a.flac", 440, seconds=1.3, rate=44_100)
    fx.write_tone(tmp_path / "clips" / "sub" / "b.wav", 880, seconds=0.4)
    (tmp_path / "clips" / "notes.txt").write_text("not audio")
    folder = storage.path(f"{gcs_bucket}/audio")
    storage.copy_tree(storage.path(tmp_path / "clips"), folder)
    remote = folder / "a.flac"
    np.testing.assert_array_equal(audio.read_audio(str(remote)), audio.read_audio(local))
    np.testing.assert_array_equal(
        np.concatenate(list(audio.read_blocks(str(remote), block_seconds=0.5))),
        np.concatenate(list(audio.read_blocks(local, block_seconds=0.5))),
    )
    files, root = cli.audio_inputs(str(folder))
    names = ("a.flac", "notes.txt", "sub/b.wav")  # decoding decides which are audio
    assert [str(f) for f in files] == [str(folder / n) for n in names]
    assert str(root) == str(folder)
    with pytest.raises(audio.AudioError, match="no such file"):
        audio.read_audio(f"{gcs_bucket}/audio/missing.wav")


def test_a_dataset_prepared_into_the_bucket_holds_the_local_records(gcs_bucket, data_dir):
    remote = datasets.prepare("synthetic", f"{gcs_bucket}/data", clips_per_class=4)
    local = datasets.load("synthetic", data_dir)
    assert str(remote.directory).startswith(f"{gcs_bucket}/data/synthetic/")
    assert remote.split_sizes == local.split_sizes == {"train": 30, "test": 10}
    read, expected = remote.source("test"), local.source("test")  # array_record's GCS reader
    for i in range(len(expected)):
        assert read[i]["id"] == expected[i]["id"] and read[i]["audio"] == expected[i]["audio"]
    again = datasets.prepare("synthetic", f"{gcs_bucket}/data", clips_per_class=99)
    assert again.split_sizes == remote.split_sizes  # prepared once: reused, not rebuilt


def test_an_upload_cut_short_is_not_taken_for_a_prepared_dataset(gcs_bucket, monkeypatch):
    copy_file, copied = storage.copy_file, []

    def cut_short(source, target):  # the upload dies before its last file
        if copied and len(copied) == total[0] - 1:
            raise OSError("connection reset")
        copied.append(target.name)
        copy_file(source, target)

    total = [0]
    real_tree = storage.files_under

    def counted(root):
        names = real_tree(root)
        total[0] = total[0] or len(names)
        return names

    monkeypatch.setattr(storage, "copy_file", cut_short)
    monkeypatch.setattr(storage, "files_under", counted)
    url = f"{gcs_bucket}/cut_short"
    with pytest.raises(OSError, match="connection reset"):
        datasets.prepare("synthetic", url, clips_per_class=1)
    assert datasets.PREPARED_MARK not in copied and len(copied) == total[0] - 1
    with pytest.raises(datasets.DatasetNotFoundError):
        datasets.load("synthetic", url)
    monkeypatch.undo()
    prepared = datasets.prepare("synthetic", url, clips_per_class=1)  # a new try completes
    assert datasets.load("synthetic", url).split_sizes == prepared.split_sizes == {"train": 10}


def test_a_missing_bucket_is_named_before_any_work(gcs_bucket, data_dir, tmp_path):
    missing = "gs://no-such-bucket"
    with pytest.raises(storage.MissingBucket, match="bucket gs://no-such-bucket does not exist"):
        train_lib.train(th.tiny_config(data_dir), f"{missing}/run")
    with pytest.raises(storage.MissingBucket):
        datasets.prepare("synthetic", f"{missing}/data", clips_per_class=1)
    with pytest.raises(storage.MissingBucket):
        checkpoints.export(
            f"{missing}/export", {"encoder": {}}, None, kind="x", target_frames=1, norm=(0, 1)
        )
    assert not storage.path(missing).exists()  # and none was made


RUN = {"num_train_steps": 60, "checkpoint_every": 10}


@pytest.mark.subprocess
def test_a_run_in_the_bucket_survives_sigkill_and_resumes_exactly(gcs_bucket, data_dir, tmp_path):
    reference = tmp_path / "local"
    train_lib.train(th.tiny_config(data_dir, **RUN), reference)
    expected = {step: values[0] for step, values in th.losses(reference).items()}
    bucket_data = f"{gcs_bucket}/sigkill/data"
    storage.copy_tree(storage.path(data_dir), storage.path(bucket_data))
    workdir = f"{gcs_bucket}/sigkill/run"
    proc = th.launch_train(
        workdir, ["--config=configs/demo.py", *th.tiny_flags(bucket_data, **RUN)]
    )
    deadline = time.time() + 300
    while not saved_steps(workdir):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, "no checkpoint in the bucket after 300 s"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    survivors = saved_steps(workdir)
    assert survivors and max(survivors) < RUN["num_train_steps"]
    train_lib.train(th.tiny_config(bucket_data, **RUN), workdir)  # a fresh process's resume
    assert RUN["num_train_steps"] in saved_steps(workdir)
    assert_same_losses(workdir, expected)  # replayed steps too, bit for bit
    objects = storage.files_under(storage.path(workdir))
    assert {"config.json", "metrics.jsonl"} <= set(objects)
    assert any(o.startswith("tensorboard/events.out.tfevents.") for o in objects)
    assert any(o.startswith(f"checkpoints/{RUN['num_train_steps']}/state/") for o in objects)
    assert_no_url_folders(th.ROOT, tmp_path, Path.cwd())


@pytest.mark.subprocess
def test_two_processes_train_into_one_bucket_workdir(gcs_bucket, data_dir, tmp_path):
    single = tmp_path / "single"
    config = th.tiny_config(data_dir, num_train_steps=3, checkpoint_every=3)
    config.optim.decay_steps = 8
    train_lib.train(config, single)
    workdir = f"{gcs_bucket}/pair/run"
    wait_all(launch_pair(workdir, data_dir, steps=3))
    assert saved_steps(workdir) == [3]
    expected = restore_on_one_device(single, 3, data_dir)
    got = restore_on_one_device(workdir, 3, data_dir)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)  # two processes sum in another order
    assert sorted(th.losses(workdir)) == [1, 2, 3]  # written once, by process 0
    assert_no_url_folders(th.ROOT, tmp_path)


@pytest.mark.subprocess
def test_export_fine_tuning_and_the_tools_read_and_write_the_bucket(gcs_bucket, data_dir, tmp_path):
    root = f"{gcs_bucket}/tools"
    train_lib.train(th.tiny_config(data_dir, num_train_steps=2), f"{root}/pretrain")
    done = run_tool("export", f"--workdir={root}/pretrain", f"--output={root}/export")
    assert done.returncode == 0, done.stderr[-3000:]
    assert checkpoints.export_description(f"{root}/export")["kind"] == "pretrain"

    config = configured("configs/finetune_demo.py", f"data_dir={data_dir},init_from={root}/export")
    state, _, _ = train_lib.train(config, f"{root}/finetune")
    exported = checkpoints.restore_params(
        f"{root}/export", checkpoints.restore_target(state.params["encoder"]), ("encoder",)
    )
    first = jax.tree.leaves(train_lib.train(configured(
        "configs/finetune_demo.py", f"data_dir={data_dir},init_from={root}/export",
        num_train_steps=0, **{"optim.warmup_steps": 0},
    ), tmp_path / "start").state.params["encoder"])  # fmt: skip
    for a, b in zip(first, jax.tree.leaves(exported), strict=True):
        np.testing.assert_array_equal(a, b)  # fine-tuning started from the export

    wav = fx.write_tone(tmp_path / "clips" / "a.wav", 440, seconds=1.3)
    storage.copy_tree(storage.path(tmp_path / "clips"), storage.path(f"{root}/clips"))
    done = run_tool(
        "extract", f"--checkpoint={root}/export", f"--audio={root}/clips", f"--output={root}/emb"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with (storage.path(f"{root}/emb") / "a.utterance.npy").open("rb") as f:
        utterance = np.load(f)
    embedder = embeddings.Embedder(inference.load_encoder(f"{root}/export"))
    local = embeddings.assemble(embedder, embedder.of_file(wav), "concat")
    np.testing.assert_allclose(utterance, local.utterance, atol=1e-5)

    done = run_tool(
        "infer", f"--checkpoint={root}/finetune", f"--audio={root}/clips/a.wav",
        f"--output={root}/labels.json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = json.loads(storage.path(f"{root}/labels.json").read_text())["files"]
    assert result["file"] == f"{root}/clips/a.wav" and len(result["labels"]) == 5
    assert_no_url_folders(th.ROOT, tmp_path)
