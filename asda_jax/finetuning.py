"""The fine-tuning task: encoder → pooled token → LayerNorm → Linear, the release's recipe.

``task="finetune"`` trains everything with layer-wise lr decay (the recipe:
docs/method.md); ``task="linear_probe"`` freezes the encoder and
trains ``fc_norm`` and ``head`` only. The step augments in the jitted program
(``objectives.augment``) and minimises ``objectives.classification_loss``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from asda_jax import checkpoints, config_lib, flop_counts, objectives, optim, train_state
from asda_jax import model as model_lib
from asda_jax.data import datasets, pipeline


class FinetuneTask:
    """Fine-tuning or linear probing of a run's ``Classifier``, on the devices its
    config was read for."""

    def __init__(self, config: config_lib.RunConfig):
        self.config = config
        self.frozen = config.task == "linear_probe"
        model_cfg = config.model
        self.model_cfg = dataclasses.replace(model_cfg, drop_path=0.0) if self.frozen else model_cfg
        self.run = config.execution
        self.forms = config.chip.forms
        self.ft_cfg = config.finetune
        self.data_cfg = config.data
        self.eval_cfg = config.eval_data
        self.optim_cfg = config.optim
        self.num_classes = datasets.class_count(self.data_cfg.dataset, self.data_cfg.data_dir)
        self.model = model_lib.Classifier(
            self.model_cfg, self.num_classes, self.ft_cfg.pooling, run=self.run
        )

    def init_params(self, rng: jax.Array):
        spec = jnp.zeros((1, self.data_cfg.target_frames, self.model_cfg.num_mel_bins))
        return self.model.init(rng, spec)["params"]

    def optimizer(self, params) -> optax.GradientTransformation:
        tx = optim.make_optimizer(self.optim_cfg, params, depth=self.model_cfg.depth)
        if not self.frozen:
            return tx
        labels = jax.tree_util.tree_map_with_path(
            lambda path, _: "frozen" if path[0].key == "encoder" else "trained", params
        )
        return optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)

    def step_flops(self, clips: int) -> float:
        """The model FLOPs of one step on ``clips`` clips (``flop_counts``), all devices."""
        frames = self.data_cfg.target_frames
        return flop_counts.finetuning_step(self.model_cfg, clips, frames, self.frozen)

    def init_teacher(self, params):
        return None

    def load_initial(self, state: train_state.TrainState) -> train_state.TrainState:
        """The encoder from ``finetune.init_from`` (the student of a pretraining run, the
        encoder of a fine-tuning run, or an export), restored onto this run's mesh."""
        if not self.ft_cfg.init_from:
            return state
        target = checkpoints.restore_target(state.params["encoder"])
        encoder = checkpoints.restore_params(self.ft_cfg.init_from, target, ("encoder",))
        return state.replace(params={**state.params, "encoder": encoder})

    def logits(self, params, spec, train: bool, dropout_key=None) -> jax.Array:
        rngs = {"dropout": dropout_key} if train else {}
        return self.model.apply({"params": params}, spec, None, train, rngs=rngs)

    def scores(self, params, spec) -> jax.Array:  # (B, C): softmax or sigmoid
        """Evaluation scores: no augmentation, no dropout."""
        return objectives.scores_of(self.logits(params, spec, train=False), self.ft_cfg)

    def step(self, state: train_state.TrainState, batch: dict, tx):
        spec, _ = pipeline.spectrograms(batch, self.data_cfg, self.forms)
        key = jax.random.fold_in(state.rng, state.step)
        aug_key, dropout_key = jax.random.split(key)
        spec, labels = objectives.augment(aug_key, spec, batch["labels"], self.ft_cfg)

        def loss_fn(params):
            if self.frozen:  # no backward through the encoder
                params = {**params, "encoder": jax.lax.stop_gradient(params["encoder"])}
            logits = self.logits(params, spec, not self.frozen, dropout_key)
            return objectives.classification_loss(logits, labels, self.ft_cfg)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        state, update = train_state.apply_gradients(
            state, grads, tx, optim.schedule(self.optim_cfg)
        )
        return state, {"loss": loss} | update

    def check(self, step: int, metrics: dict) -> None:
        train_state.check_finite(step, metrics)
