"""Our models as Hugging Face folders transformers loads as they stand (both attention
forms, encoders and classifiers): the same features, scores, fbank and top labels as
ours, offline, with the folder's own code; and back to identical parameters."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf
import torch

from asda_jax import (
    audio,
    checkpoints,
    config_lib,
    embeddings,
    evaluation,
    hf_weights,
    inference,
    serving,
    timeline,
    train_lib,
    windows,
)
from asda_jax import model as model_lib
from asda_jax.data import datasets, synthetic
from tests import train_helpers as th
from tests.test_hf_weights import noisy_classifier

transformers = pytest.importorskip("transformers")
NAMES = ["dog", "rain", "clock tick", "siren", "wind"]
HEAD = {"pooling": "cls", "scores": "softmax"}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Nothing may reach the hub: every load below reads the folder alone."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def random_classifier(attention: str, seed: int):
    """A tiny classifier of ``attention``'s form with non-trivial values everywhere."""
    cfg = model_lib.preset("tiny", attention=attention)
    return cfg, noisy_classifier(cfg, len(NAMES), seed)


def load_report(auto, folder):
    model, info = auto.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
    return model.eval(), {k: sorted(v) for k, v in info.items() if k != "error_msgs"}


NO_PROBLEMS = {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}


@pytest.mark.parametrize("attention", ["asda", "plain"])
def test_transformers_loads_both_forms_and_computes_what_we_compute(attention, tmp_path):
    cfg, params = random_classifier(attention, seed=3)
    norm = audio.NORM_STATS["esc50"]
    encoder_folder = hf_weights.export_model(
        tmp_path / "encoder", {"encoder": params["encoder"]}, cfg, 1024, norm=norm
    )
    classifier_folder = hf_weights.export_model(
        tmp_path / "classifier", params, cfg, 1024, norm=norm, head=HEAD, names=NAMES
    )
    encoder, report = load_report(transformers.AutoModel, encoder_folder)
    assert report == NO_PROBLEMS and type(encoder).__name__ == "ASDAModel"
    classifier, report = load_report(
        transformers.AutoModelForAudioClassification, classifier_folder
    )
    assert report == NO_PROBLEMS and classifier.config.id2label[3] == "siren"
    rng = np.random.default_rng(0)
    for frames in (1024, 512, 200):
        spec = rng.standard_normal((2, frames, cfg.num_mel_bins)).astype(np.float32)
        ours = model_lib.Encoder(cfg).apply({"params": params["encoder"]}, jnp.asarray(spec))
        logits = model_lib.Classifier(cfg, len(NAMES)).apply({"params": params}, jnp.asarray(spec))
        with torch.no_grad():
            tokens = encoder(torch.from_numpy(spec)).last_hidden_state.numpy()
            theirs = classifier(torch.from_numpy(spec)).logits.numpy()
        np.testing.assert_allclose(tokens, ours.tokens, atol=1e-5, err_msg=f"{frames} frames")
        np.testing.assert_allclose(theirs, logits, atol=1e-5, err_msg=f"{frames} frames")
    extractor = transformers.AutoFeatureExtractor.from_pretrained(
        classifier_folder, trust_remote_code=True
    )
    for seconds in (3.0, 12.0):  # padded and cropped to the input
        wave = (0.1 * rng.standard_normal(int(seconds * audio.SAMPLE_RATE))).astype(np.float32)
        features = extractor(wave, sampling_rate=16_000, return_tensors="np")["input_values"]
        expected, _ = audio.spectrogram(wave, 1024, norm)
        np.testing.assert_allclose(features[0], expected, atol=1e-4)
    with pytest.raises(ValueError, match="44100 Hz"):
        extractor(wave, sampling_rate=44_100)
    # Back through our importer (launch/convert_torch.py's): the same parameters, bit for bit.
    for folder, kept in ((encoder_folder, ["encoder"]), (classifier_folder, sorted(params))):
        imported = hf_weights.import_model(str(folder))
        assert sorted(imported.params) == kept and imported.hub.norm == norm
        jax.tree.map(np.testing.assert_array_equal, imported.params, {k: params[k] for k in kept})
    assert imported.hub.names == NAMES and imported.hub.head == HEAD


def test_a_form_without_a_pytorch_layout_and_a_head_without_names_are_refused(tmp_path):
    cfg, params = random_classifier("asda", seed=1)
    with pytest.raises(ValueError, match="'diff' attention form has no PyTorch layout"):
        hf_weights.export_model(
            tmp_path / "a", params, model_lib.preset("tiny", attention="diff"), 64, head=HEAD
        )
    with pytest.raises(ValueError, match="4 class names for a head of 5"):
        hf_weights.export_model(tmp_path / "b", params, cfg, 64, head=HEAD, names=NAMES[:4])
    with pytest.raises(ValueError, match="needs its head"):
        hf_weights.export_model(tmp_path / "c", params, cfg, 64)
    assert not any((tmp_path / name).exists() for name in "abc")  # nothing half-written


@pytest.fixture(scope="module")
def finetuned_run(tmp_path_factory):
    """A tiny fine-tuning run of the release form on the synthetic classes (random
    init, 4 steps, evaluated), and a clip to label."""
    root = tmp_path_factory.mktemp("finetuned")
    datasets.prepare("synthetic", root / "data", clips_per_class=4)
    config = config_lib.load_file(
        "configs/finetune_demo.py", f"data_dir={root / 'data'},init_from="
    )
    config.update_from_flattened_dict(
        {"model.preset": "tiny", "num_train_steps": 4, "optim.warmup_steps": 1}
    )
    state, task, mesh = train_lib.train(config, root / "run")
    evaluation.final_evaluation(state, task, mesh, root / "run")  # as launch/train.py does
    clip = root / "clip.wav"
    sf.write(clip, synthetic.clip(3, seed=7), audio.SAMPLE_RATE)  # one clip: one window
    return root / "run", clip


def launch(script: str, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, f"launch/{script}.py", *args]
    return subprocess.run(command, cwd=th.ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.subprocess
@pytest.mark.train
def test_a_run_exported_for_transformers_answers_the_pipeline_as_infer_does(
    finetuned_run, tmp_path
):
    run, clip = finetuned_run
    folder = tmp_path / "hf"
    done = launch("export", f"--workdir={run}", f"--output={folder}", "--format=hf")
    assert done.returncode == 0, done.stderr[-3000:]
    names = datasets.load("synthetic", str(run.parent / "data")).class_names
    config = json.loads((folder / "config.json").read_text())
    assert config["id2label"] == {str(i): n for i, n in enumerate(names)}
    card = (folder / "README.md").read_text()
    for fact in (f"{len(names)} classes", "128 frames (1.29 s)", "4 steps", "finetune on synthetic",
                 "accuracy", "arXiv:2507.02666", "trust_remote_code=True"):  # fmt: skip
        assert fact in card, fact
    classify = transformers.pipeline(
        "audio-classification", model=str(folder), trust_remote_code=True
    )
    wave, rate = sf.read(clip, dtype="float32")
    answered = classify({"array": wave, "sampling_rate": rate}, top_k=len(names))
    output = tmp_path / "labels.json"
    infer = launch("infer", f"--checkpoint={run}", f"--audio={clip}", f"--top_k={len(names)}",
                   f"--output={output}")  # fmt: skip
    assert infer.returncode == 0, infer.stderr[-3000:]
    (labelled,) = json.loads(output.read_text())["files"]
    assert [a["label"] for a in answered] == [name for name, _ in labelled["labels"]]
    np.testing.assert_allclose(
        [a["score"] for a in answered], [score for _, score in labelled["labels"]], atol=1e-4
    )
    # The folder back through launch/convert_torch.py: the run's parameters, bit for bit.
    back = tmp_path / "back"
    converted = launch("convert_torch", f"--checkpoint={folder}", f"--output={back}")
    assert converted.returncode == 0, converted.stderr[-3000:]
    item, prefix = checkpoints.locate_params(run)
    saved = checkpoints.restore_item(item, prefix)
    restored = checkpoints.restore_item(*checkpoints.locate_params(back))
    for key in ("encoder", "fc_norm", "head"):
        jax.tree.map(np.testing.assert_array_equal, restored[key], saved[key])
    assert inference.describe(back).head == {"pooling": "cls", "scores": "softmax"}


# ---------------------------------------------------------------------------- SavedModel

SERVED = """
import sys
import numpy as np
from asda_jax import serving

batch = np.load(sys.argv[1])
out = {}
for name in ("classifier", "encoder"):
    serve = serving.load(sys.argv[2] + "/" + name)
    for key, value in serve(waveforms=batch["waves"], lengths=batch["lengths"]).items():
        out[f"{name}/{key}"] = value.numpy()
np.savez(sys.argv[3], **out)
"""


@pytest.mark.subprocess
def test_a_saved_model_serves_our_scores_and_embeddings_from_waveforms(tmp_path):
    cfg, params = random_classifier("asda", seed=5)
    norm = audio.NORM_STATS["audioset"]
    classifier = checkpoints.export(
        tmp_path / "classifier", params, cfg, kind="finetune", pooling="cls", scores="sigmoid",
        target_frames=128, norm=norm,
    )  # fmt: skip
    encoder = checkpoints.export(
        tmp_path / "encoder", {"encoder": params["encoder"]}, cfg, kind="pretrain",
        target_frames=128, norm=norm,
    )  # fmt: skip
    served = tmp_path / "served"
    done = launch("export", f"--workdir={classifier}", f"--output={served / 'classifier'}",
                  "--format=saved_model")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert serving.export(encoder, served / "encoder") == "encoder"
    with pytest.raises(FileExistsError):
        serving.export(encoder, served / "encoder")
    rng = np.random.default_rng(2)
    # Shorter than the 1.29 s input, exactly one, and several times longer.
    clips = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (9_000, 20_720, 100_000)]
    waves, lengths = serving.as_batch(clips)
    np.savez(tmp_path / "in.npz", waves=waves, lengths=lengths)
    command = [
        sys.executable,
        "-c",
        SERVED,
        str(tmp_path / "in.npz"),
        str(served),
        str(tmp_path / "out.npz"),
    ]
    done = subprocess.run(command, cwd=th.ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = np.load(tmp_path / "out.npz")
    loaded = inference.load_classifier(classifier)
    windowing = windows.Windowing(128, 128)
    for row, clip in enumerate(clips):
        cut = windows.windows_of_array(clip, windowing, norm)
        scored = list(timeline.classify_windows(loaded.classify, cut, 4))
        assert len(scored) == (1, 1, 5)[row]
        expected = timeline.file_scores(scored, "max")
        np.testing.assert_allclose(out["classifier/scores"][row], expected, atol=1e-4)
    ours = embeddings.embed_clips(embeddings.Embedder(inference.load_encoder(encoder)), clips)
    steps = ours.steps.shape[1]
    np.testing.assert_allclose(out["encoder/embedding"], ours.scene, atol=1e-4)
    np.testing.assert_array_equal(out["encoder/num_frames"], ours.num_steps)
    np.testing.assert_allclose(out["encoder/frames"][:, :steps], ours.steps, atol=1e-4)
    assert not out["encoder/frames"][:, steps:].any()
    np.testing.assert_allclose(out["encoder/times_ms"][:steps], ours.times_ms[0])
