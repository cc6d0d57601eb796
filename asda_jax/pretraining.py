"""The pretraining task: student encoder + CNN decoder against an EMA teacher.

One step (``docs/method.md``): spectrograms of the batch (on the host, or here
from waveforms), the release's objective (``objectives.pretraining_step_loss``), AdamW,
then the teacher moves toward the updated student by the annealed EMA decay.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from asda_jax import checkpoints, config_lib, flop_counts, objectives, optim, train_state
from asda_jax import model as model_lib
from asda_jax.data import pipeline


class PretrainTask:
    """Self-supervised pretraining of a run's config, on the devices it was read for."""

    def __init__(self, config: config_lib.RunConfig):
        self.config = config
        self.model_cfg = config.model
        self.run = config.execution
        self.forms = config.chip.forms
        self.mask_cfg = config.mask
        self.pre_cfg = config.pretrain
        self.data_cfg = config.data
        self.optim_cfg = config.optim
        self.encoder = model_lib.Encoder(self.model_cfg, run=self.run)
        self.decoder = model_lib.Decoder(self.model_cfg, run=self.run)
        self.grid = objectives.grid_shape(self.data_cfg.target_frames, self.model_cfg)

    def init_params(self, rng: jax.Array):
        """Boxed (logically named) student parameters."""
        enc_key, dec_key = jax.random.split(rng)
        spec = jnp.zeros((1, self.data_cfg.target_frames, self.model_cfg.num_mel_bins))
        grid = jnp.zeros((1, *self.grid, self.model_cfg.embed_dim))
        return {
            "encoder": self.encoder.init(enc_key, spec)["params"],
            "decoder": self.decoder.init(dec_key, grid)["params"],
        }

    def optimizer(self, params) -> optax.GradientTransformation:
        return optim.make_optimizer(self.optim_cfg, params)

    def step_flops(self, clips: int) -> float:
        """The model FLOPs of one step on ``clips`` clips (``flop_counts``), all devices."""
        frames = self.data_cfg.target_frames
        return flop_counts.pretraining_step(self.model_cfg, self.mask_cfg, clips, frames)

    def init_teacher(self, params):
        return params["encoder"]  # the teacher starts as an exact copy

    def load_initial(self, state: train_state.TrainState) -> train_state.TrainState:
        """Random init, or with ``pretrain.init_from`` student and teacher both the
        export's encoder (restored onto this run's mesh); the decoder stays fresh."""
        if not self.pre_cfg.init_from:
            return state
        target = checkpoints.restore_target(state.params["encoder"])
        encoder = checkpoints.restore_params(self.pre_cfg.init_from, target, ("encoder",))
        teacher = jax.tree.map(jnp.copy, encoder)  # buffers of its own: the step donates both
        return state.replace(params={**state.params, "encoder": encoder}, teacher=teacher)

    def step(self, state: train_state.TrainState, batch: dict, tx):
        spec, _ = pipeline.spectrograms(batch, self.data_cfg, self.forms)
        key = jax.random.fold_in(state.rng, state.step)

        def loss_fn(params):
            return objectives.pretraining_step_loss(
                self.encoder, self.decoder, params, state.teacher, spec, key,
                self.mask_cfg, self.pre_cfg,
            )  # fmt: skip

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        state, update = train_state.apply_gradients(
            state, grads, tx, optim.schedule(self.optim_cfg)
        )
        weight = objectives.ema_weight(state.step, self.pre_cfg)  # d(u + 1) after update u
        teacher = objectives.ema_update(state.teacher, state.params["encoder"], weight)
        return state.replace(teacher=teacher), metrics | update | {"ema_weight": weight}

    def check(self, step: int, metrics: dict) -> None:
        """Stops the run on a NaN loss, or on a collapse once past its grace period."""
        train_state.check_finite(step, metrics)
        cfg = self.pre_cfg
        if step < cfg.collapse_check_after:
            return
        if metrics["target_std"] < cfg.min_target_var or metrics["pred_std"] < cfg.min_pred_var:
            raise train_state.TrainingStopped(
                f"step {step}: representation collapse: target_std {metrics['target_std']:.4g} "
                f"(min_target_var {cfg.min_target_var}), pred_std {metrics['pred_std']:.4g} "
                f"(min_pred_var {cfg.min_pred_var}); stopping without saving this state"
            )
