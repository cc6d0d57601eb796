"""The HEAR benchmark's API (hear-eval-kit, hearvalidator) over an ASDA encoder.

    hear-validator asda_jax.hear -m <export or training workdir>
    python -m heareval.embeddings.runner asda_jax.hear --model <export or workdir> ...

``load_model(path)`` gives a ``torch.nn.Module`` (hear-eval-kit accepts only torch or
TensorFlow modules) that holds the jitted JAX encoder and its windowing; it has no
torch parameters, so moving it to a device moves nothing and the encoder runs on JAX's
devices. ``get_scene_embeddings`` and ``get_timestamp_embeddings`` take
(n_sounds, n_samples) torch tensors at 16 kHz, as HEAR passes them, and return float32
torch tensors on the input's device:

- scene: (n_sounds, 768 at base), the utterance embedding of ``asda_jax.embeddings``;
- timestamps: (n_sounds, n_steps, 768) every 160 ms (one 16-frame patch row, its
  frequency patches averaged), with (n_sounds, n_steps) centres in ms.

Sounds of any length work (HEAR asks for up to 20 minutes): they are cut into windows
of the encoder's training length. Torch is a dependency of this module only.
"""

from __future__ import annotations

import numpy as np
import torch

from asda_jax import audio, embeddings, inference

TIMESTAMP_POOLING = "mean"


class HearModel(torch.nn.Module):
    """An ASDA encoder as HEAR sees a model: its attributes and the windowed encoder."""

    sample_rate = audio.SAMPLE_RATE

    def __init__(self, embedder: embeddings.Embedder):
        super().__init__()
        self.embedder = embedder
        self.scene_embedding_size = int(embedder.dim)
        self.timestamp_embedding_size = int(embedder.step_dim(TIMESTAMP_POOLING))

    def forward(self, sounds: torch.Tensor) -> torch.Tensor:
        return get_scene_embeddings(sounds, self)


def load_model(model_file_path: str = "", batch_size: int | None = None) -> HearModel:
    """The encoder of an export or a training workdir at ``model_file_path``."""
    if not model_file_path:
        raise ValueError(
            "asda_jax.hear needs a model: pass an export or a training workdir "
            "(hear-validator asda_jax.hear -m <path>)"
        )
    encoder = inference.load_encoder(model_file_path)
    return HearModel(embeddings.Embedder(encoder, batch_size=batch_size))


def _embedded(sounds: torch.Tensor, model: HearModel) -> embeddings.ClipEmbeddings:
    if sounds.ndim != 2:
        raise ValueError(f"expected (n_sounds, n_samples) audio, got shape {tuple(sounds.shape)}")
    clips = sounds.detach().to("cpu", torch.float32).numpy()
    return embeddings.embed_clips(model.embedder, list(clips), pooling=TIMESTAMP_POOLING)


def _tensor(array: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, np.float32)).to(like.device)


def get_scene_embeddings(sounds: torch.Tensor, model: HearModel) -> torch.Tensor:
    return _tensor(_embedded(sounds, model).scene, sounds)


def get_timestamp_embeddings(
    sounds: torch.Tensor, model: HearModel
) -> tuple[torch.Tensor, torch.Tensor]:
    out = _embedded(sounds, model)
    return _tensor(out.steps, sounds), _tensor(out.times_ms, sounds)
