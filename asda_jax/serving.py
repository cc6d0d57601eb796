"""A TensorFlow SavedModel of a classifier or an encoder: 16 kHz waveforms in, the
tools' scores or embeddings out, with the front end inside.

The serving signature takes ``waveforms`` (B, N) float32 (16 kHz mono in [-1, 1],
zero-padded to the longest) and ``lengths`` (B,) int32 (each clip's real samples, at
least one 25 ms frame). Each clip is cut into windows of the model's input length (the
hop the window: ``launch/infer.py``'s and ``extract.py``'s default) and gives:

- a classifier: ``scores`` (B, C), each window scored as ``infer.py`` scores it (the
  last one padded, no mask), the maximum over the clip's windows (``--pooling=max``);
- an encoder: ``embedding`` (B, D), the windows' CLS outputs weighted by their real
  frames, and ``frames`` (B, S, D), one row per 160 ms time step (its frequency
  patches averaged), zero past the clip's ``num_frames`` (B,) rows, at ``times_ms``
  (S,): ``embeddings.embed_clips``' values.

jax2tf converts the tools' own JAX functions (the fbank, its normalisation and masks,
the model) with the window count polymorphic, the parameters as TF variables; the
serving function around them only cuts the clips into windows and gathers each clip's
windows back (TF ops). The program is lowered for the platforms named (CPU by
default): one lowered for ("cpu", "tpu") also runs on TPUs (TF Serving or Vertex AI
with TPU support); the model always computes in float32 with XLA's attention and MLPs,
not the Pallas kernels.
"""

from __future__ import annotations

import os

import numpy as np

from asda_jax import audio, embeddings, hardware, inference, storage
from asda_jax import model as model_lib

SIGNATURE = "serving_default"
EXPORT_RUN = model_lib.Execution(chip="cpu")  # float32 XLA forms: portable, no kernels


def window_program(path: str | os.PathLike, step: int | None = None):
    """(pure JAX function (params, (V, S) window waveforms, (V,) real samples) → outputs,
    params, ModelInput, ModelConfig, kind) of a workdir or an export."""
    description = inference.describe(path)
    norm, opts, forms = description.input.norm, audio.RELEASE_FBANK, hardware.PLAIN
    if description.head is not None:
        classifier, params, inputs = inference.classifier_parts(path, step, EXPORT_RUN)
        scores = inference.classifier_scores(classifier, inputs)

        def classify(params, waves, num_samples):  # -> (V, C)
            spec, _ = audio.normalised_spectrogram(waves, num_samples, norm, opts, forms)
            return scores(params, spec, None)

        return classify, params, inputs, classifier.cfg, "classifier"
    encoder, params, inputs = inference.encoder_parts(path, step, run=EXPORT_RUN)
    cfg = encoder.cfg

    def encode(params, waves, num_samples):  # -> (V, D), (V, T/16, D), (V,) frames
        spec, frames = audio.normalised_spectrogram(waves, num_samples, norm, opts, forms)
        lengths = -(-frames // cfg.patch_size) * cfg.patch_size  # whole patches, as extract
        tokens = encoder.apply({"params": params}, spec, lengths).tokens
        grid = tokens[:, 1:].reshape(tokens.shape[0], -1, cfg.freq_patches, cfg.embed_dim)
        return tokens[:, 0], grid.mean(axis=2), frames

    return encode, params, inputs, cfg, "encoder"


def export(
    path: str | os.PathLike,
    output: str | os.PathLike,
    step: int | None = None,
    platforms: tuple[str, ...] = ("cpu",),
) -> str:
    """Writes the SavedModel of a workdir or an export to ``output``; its kind."""
    import tensorflow as tf
    from jax.experimental import jax2tf

    storage.make_new_folder(storage.path(output))  # never into a folder in use
    program, params, inputs, cfg, kind = window_program(path, step)
    opts = audio.RELEASE_FBANK
    window, hop = opts.num_samples(inputs.target_frames), inputs.target_frames * opts.window_shift
    converted = jax2tf.convert(
        program,
        polymorphic_shapes=[None, "(v, _)", "(v,)"],
        with_gradient=False,
        native_serialization_platforms=platforms,
    )
    module = tf.Module()
    module.params = tf.nest.map_structure(lambda x: tf.Variable(np.asarray(x)), params)

    def windows_of(waveforms, lengths):
        """(V, window) waveforms, (V,) real samples and (V, 2) [clip, window] indices
        of every window the clips hold (``windows.Windowing.holds_window``)."""
        cut = tf.signal.frame(waveforms, window, hop, pad_end=True)  # (B, K, window)
        k = tf.range(tf.shape(cut)[1])[None, :]
        length = lengths[:, None]
        holds = (k == 0) | (
            ((k - 1) * hop + window < length) & (length - k * hop >= opts.window_size)
        )
        where = tf.where(holds)  # (V, 2) int64
        real = tf.clip_by_value(tf.gather_nd(length - k * hop, where), 0, window)
        return tf.gather_nd(cut, where), real, where, tf.shape(cut)[1]

    spec = [
        tf.TensorSpec([None, None], tf.float32, "waveforms"),
        tf.TensorSpec([None], tf.int32, "lengths"),
    ]

    @tf.function(input_signature=spec, autograph=False)
    def serve(waveforms, lengths):
        tf.debugging.assert_greater_equal(
            lengths, opts.window_size, message="a clip shorter than one 25 ms frame"
        )
        cut, real, where, count = windows_of(waveforms, lengths)
        clip, clips = where[:, 0], tf.shape(waveforms)[0]
        if kind == "classifier":
            scores = converted(module.params, cut, real)
            return {"scores": tf.math.unsorted_segment_max(scores, clip, clips)}
        cls, steps, frames = converted(module.params, cut, real)
        weight = tf.cast(frames, tf.float32)[:, None]
        total = tf.math.unsorted_segment_sum(cls * weight, clip, clips)
        embedding = total / tf.math.unsorted_segment_sum(weight, clip, clips)
        per_window = tf.shape(steps)[1]
        shape = tf.cast(tf.stack([clips, count, per_window, cfg.embed_dim]), tf.int64)
        grid = tf.scatter_nd(where, steps, shape)
        grid = tf.reshape(grid, [clips, count * per_window, cfg.embed_dim])
        real_steps = (frames + cfg.patch_size - 1) // cfg.patch_size
        num_frames = tf.math.unsorted_segment_sum(real_steps, clip, clips)
        kept = tf.range(count * per_window)[None, :] < num_frames[:, None]
        first, second = embeddings.step_times_ms(0, 2, cfg)
        times = first + (second - first) * tf.cast(tf.range(count * per_window), tf.float64)
        return {
            "embedding": embedding,
            "frames": tf.where(kept[..., None], grid, 0.0),
            "num_frames": num_frames,
            "times_ms": tf.cast(times, tf.float32),
        }

    module.serve = serve
    tf.saved_model.save(module, os.fspath(output), signatures={SIGNATURE: serve})
    return kind


def load(output: str | os.PathLike):
    """The serving function of a SavedModel written by ``export``."""
    import tensorflow as tf

    return tf.saved_model.load(os.fspath(output)).signatures[SIGNATURE]


def as_batch(clips: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Mono 16 kHz clips as the signature's (B, N) zero-padded waveforms and lengths."""
    longest = max(c.shape[0] for c in clips)
    waves = np.zeros((len(clips), longest), np.float32)
    for row, c in enumerate(clips):
        waves[row, : c.shape[0]] = c
    return waves, np.asarray([c.shape[0] for c in clips], np.int32)
