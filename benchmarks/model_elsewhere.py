"""Our base model where users already are: Hugging Face (transformers) and TF SavedModel.

    python -m benchmarks.model_elsewhere [--repeats 3]

A randomly initialised base classifier (527 classes, 10.24 s input; the work does not
depend on the values) is exported both ways by ``launch/export.py``'s functions: the
time each export takes and the folder's size. Then, per 10 s clip on this CPU, timed
in alternating rounds in this process:

- the model alone on the same (B, 1024, 128) spectrograms: transformers'
  ``AutoModelForAudioClassification`` (loaded from the folder, ``torch.no_grad``)
  against ours (``inference.load_classifier``, jitted), at batch 1 and 8;
- waveforms to scores: the SavedModel's serving signature (fbank and model inside,
  lowered for CPU) against ours (``windows`` + ``timeline.classify_windows``, the host
  fbank), at batch 1 and 8.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers

from asda_jax import audio, hf_weights, inference, serving, timeline, windows
from asda_jax import model as model_lib
from benchmarks import common
from benchmarks.longform import write_exports

FRAMES = 1024
CLIP_SAMPLES = audio.RELEASE_FBANK.num_samples(FRAMES)  # 10.26 s: one window


def folder_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def timed(fn) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def ratio_row(batch: int, first: float, second: float) -> list:
    """Per-clip milliseconds of two timings of a batch, and their ratio."""
    return [batch, f"{1000 * first / batch:.0f}", f"{1000 * second / batch:.0f}",
            f"{first / second:.2f}"]  # fmt: skip


def export_both(root: Path, classifier: Path) -> list:
    """Both exports of the classifier, each timed; their table rows."""
    module, params, inputs = inference.classifier_parts(classifier)
    head = inference.describe(classifier).head
    kept = {k: params[k] for k in ("encoder", "fc_norm", "head")}
    hf_s = timed(
        lambda: hf_weights.export_model(
            root / "hf", kept, module.cfg, FRAMES, norm=inputs.norm, head=head
        )
    )
    saved_s = timed(lambda: serving.export(classifier, root / "saved_model"))
    return [
        ["hf (transformers)", f"{hf_s:.1f}", f"{folder_mib(root / 'hf'):.0f}"],
        ["saved_model (CPU)", f"{saved_s:.1f}", f"{folder_mib(root / 'saved_model'):.0f}"],
    ]


def scores_of_waves(loaded, clips: list[np.ndarray], batch: int) -> np.ndarray:
    """Ours, waveform to scores: the tools' windows (one each) scored ``batch`` a call."""
    windowing = windows.Windowing(FRAMES, FRAMES)
    cut = (w for c in clips for w in windows.windows_of_array(c, windowing, loaded.input.norm))
    return np.stack([r.scores for r in timeline.classify_windows(loaded.classify, cut, batch)])


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(common.machine())
    print(common.versions(("jax", "jaxlib", "flax", "torch", "transformers", "tensorflow-cpu")))
    print(f"torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _, classifier, _ = write_exports(root, model_lib.preset("base"))
        common.print_table(
            "Exporting the base classifier", ["format", "export s", "folder MiB"],
            export_both(root, classifier),
        )  # fmt: skip
        torch_model = transformers.AutoModelForAudioClassification.from_pretrained(
            root / "hf", trust_remote_code=True
        ).eval()
        ours = inference.load_classifier(classifier)
        serve = serving.load(root / "saved_model")
        rng = np.random.default_rng(0)
        model_rows, served_rows = [], []
        for batch in (1, 8):
            spec = rng.standard_normal((batch, FRAMES, 128)).astype(np.float32)

            def run_torch(spec=spec):
                with torch.no_grad():
                    return torch_model(torch.from_numpy(spec)).logits.numpy()

            def run_ours(spec=spec):
                return np.asarray(ours.classify(spec))

            medians = common.interleaved_medians(
                [(run_torch, ()), (run_ours, ())], repeats=args.repeats, warmup=1
            )
            model_rows.append(ratio_row(batch, *medians))
            clips = [(0.1 * rng.standard_normal(CLIP_SAMPLES)).astype(np.float32)] * batch
            waves, lengths = serving.as_batch(clips)

            def run_saved(waves=waves, lengths=lengths):
                return serve(waveforms=waves, lengths=lengths)["scores"].numpy()

            medians = common.interleaved_medians(
                [(run_saved, ()), (scores_of_waves, (ours, clips, batch))],
                repeats=args.repeats,
                warmup=1,
            )
            served_rows.append(ratio_row(batch, *medians))
        common.print_table(
            "The base classifier's forward pass per 10.24 s clip (same spectrograms)",
            ["batch", "transformers ms / clip", "ours (JAX) ms / clip", "transformers / ours"],
            model_rows,
        )
        common.print_table(
            "Waveform to scores per 10.26 s clip (fbank included)",
            ["batch", "SavedModel ms / clip", "ours (JAX, host fbank) ms / clip",
             "SavedModel / ours"],
            served_rows,
        )  # fmt: skip


if __name__ == "__main__":
    main()
