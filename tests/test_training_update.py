"""The whole training update against a float64 oracle written in the release's terms.

The oracle works on release-named tensors (``asda_jax/testing/torch_reference.py``'s model in
float64 for the loss and gradients; NumPy float64 for the rest) and states each rule
as the release does (docs/method.md §4–5): the criterion's scaling, clipping at a
global norm, AdamW with fairseq's cosine schedule (warmup from the floor), weight decay
on every tensor but 1-D ones and biases, layer-wise lr decay by block, and the EMA
teacher θ_T ← d·θ_T + (1 − d)·θ_S with d(u + 1) after update u. Only its results are
carried into our layout (``release_weights``), to compare.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from asda_jax import (
    config_lib,
    hardware,
    masking,
    optim,
    release_weights,
    sharding,
    train_lib,
    train_state,
)
from asda_jax.testing import torch_reference as ref

# ---------------------------------------------------------------------------- the oracle


def release_decays(name: str, shape) -> bool:
    """The release's weight-decay rule: every tensor but 1-D ones and biases."""
    return not (len(shape) == 1 or name.endswith(".bias"))


def release_lr(u: int, peak: float, min_lr: float, warmup: int, total: int) -> float:
    """fairseq's cosine schedule at update ``u``: linear from the floor over ``warmup``
    updates, then a half cosine to the floor at ``total``; a peak under min_lr is the
    floor."""
    floor = min(min_lr, peak)
    if u < warmup:
        return floor + (peak - floor) * u / warmup
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * (u - warmup) / (total - warmup)))


def release_ema_decay(n: int, start: float, end: float, anneal: int) -> float:
    """``get_annealed_rate``: linear from start to end over ``anneal`` updates, then end."""
    return end if n >= anneal else start + (end - start) * n / anneal


def clipped(grads: dict, clip_norm: float) -> tuple[dict, float]:
    norm = math.sqrt(sum(float((g * g).sum()) for g in grads.values()))
    scale = min(1.0, clip_norm / norm) if clip_norm > 0 else 1.0
    return {k: g * scale for k, g in grads.items()}, norm


def adamw(params, grads, mu, nu, u: int, lr_of, hp) -> tuple[dict, dict, dict]:
    """One AdamW update (decoupled decay, eps outside the root of the bias-corrected
    second moment) of release-named float64 tensors; ``lr_of(name)`` is the lr at u."""
    t = u + 1
    new_p, new_m, new_v = {}, {}, {}
    for name, g in grads.items():
        m = hp["b1"] * mu[name] + (1 - hp["b1"]) * g
        v = hp["b2"] * nu[name] + (1 - hp["b2"]) * g * g
        direction = (m / (1 - hp["b1"] ** t)) / (np.sqrt(v / (1 - hp["b2"] ** t)) + hp["eps"])
        decay = hp["weight_decay"] if release_decays(name, g.shape) else 0.0
        new_p[name] = params[name] - lr_of(name) * (direction + decay * params[name])
        new_m[name], new_v[name] = m, v
    return new_p, new_m, new_v


def float64_model(state: dict, **sizes) -> ref.ReleaseModel:
    model = ref.ReleaseModel(**sizes).double()
    model.load_state_dict(
        {k: torch.from_numpy(np.asarray(v, np.float64)) for k, v in state.items()}
    )
    return model


def gradients(model: ref.ReleaseModel, loss: torch.Tensor) -> dict[str, np.ndarray]:
    loss.backward()
    return {k: p.grad.numpy() for k, p in model.named_parameters() if p.requires_grad}


def prior_moments(grads: dict, seed: int) -> tuple[dict, dict]:
    """Float32-exact moments of a run in progress, on the scale of the gradients (so
    Adam's per-element division does not magnify the last bits of tiny gradients)."""
    rng = np.random.default_rng(seed)
    mu, nu = {}, {}
    for name, g in grads.items():
        top = float(np.abs(g).max())
        mu[name] = (g * rng.uniform(-1, 1, g.shape)).astype(np.float32).astype(np.float64)
        nu[name] = (
            ((0.5 * top) ** 2 * rng.uniform(1, 2, g.shape)).astype(np.float32).astype(np.float64)
        )
    return mu, nu


# ---------------------------------------------------------------------------- our side


def set_moments(opt_state, step: int, mu, nu):
    """``opt_state`` as after ``step`` updates, with first and second moments ``mu`` and
    ``nu`` (trees of our parameters): every count, schedule's or Adam's, set to step."""

    def replace(path, leaf):
        names = optim.path_names(path)
        if names[-1] == "count":
            return jnp.full_like(leaf, step)
        for field, tree in (("mu", mu), ("nu", nu)):
            if field in names:
                for key in names[names.index(field) + 1 :]:
                    tree = tree[key]
                return jnp.asarray(tree, leaf.dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(replace, opt_state)


def adam_moments(opt_state) -> dict[str, dict]:
    """{"mu": tree, "nu": tree} of every parameter, gathered from the optimiser's groups."""
    found: dict[str, dict] = {"mu": {}, "nu": {}}
    for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state):
        names = optim.path_names(path)
        for field in set(found) & set(names):
            *parents, last = names[names.index(field) + 1 :]
            node = found[field]
            for key in parents:
                node = node.setdefault(key, {})
            node[last] = leaf
    return found


def one_step(run: config_lib.RunConfig, u: int, params, teacher, mu, nu, batch: dict):
    """Our task's jitted step from a state after ``u`` updates with these moments."""
    task = train_lib.make_task(run)
    mesh = sharding.make_mesh(run.mesh)
    rng = jax.random.PRNGKey(run.seed)
    plan = train_state.plan_state(task, mesh, rng)
    state = train_state.TrainState(
        step=jnp.int32(u),
        params=params,
        opt_state=set_moments(plan.tx.init(params), u, mu, nu),
        teacher=teacher,
        rng=rng,
    )
    with sharding.activate(mesh):
        return train_state.jit_step(task, plan, mesh, donate=False)(state, batch)[0]


def step_keys(run: config_lib.RunConfig, u: int) -> jax.Array:
    """The key our step ``u`` draws its randomness from (masks, noise, mixup)."""
    return jax.random.fold_in(jax.random.PRNGKey(run.seed), u)


def assert_within_update(ours, oracle, before, what: str, rtol: float = 1e-5):
    """|ours − oracle| ≤ rtol × the largest change the oracle made, per tensor."""
    flat = jax.tree_util.tree_leaves_with_path(ours)
    for (path, got), want, old in zip(
        flat, jax.tree.leaves(oracle), jax.tree.leaves(before), strict=True
    ):
        size = np.abs(np.asarray(want, np.float64) - np.asarray(old, np.float64)).max()
        error = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)).max()
        assert size > 0, f"{what}{jax.tree_util.keystr(path)} did not change"
        assert error <= rtol * size, (
            f"{what}{jax.tree_util.keystr(path)}: {error:.3g} off, {error / size:.3g} of its "
            f"update {size:.3g}"
        )


TINY = dict(embed_dim=64, depth=2, num_heads=4, decoder_dim=64, decoder_layers=2, decoder_groups=4)
SIZES = dict(dim=64, depth=2, num_heads=4, decoder_groups=4, decoder_grid=(8, 8))
FRAMES, BATCH, TOTAL, WARMUP = 128, 8, 100, 10  # a clip per simulated device
HP = dict(b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.05)
# Rates and EMA weights far above float32's spacing of the values they change, so the
# comparison can see 1e-5 of an update.
CLASSES_OF_AUDIOSET = 527
OPTIM = dict(lr=0.5, warmup_steps=WARMUP, clip_norm=1.0, weight_decay=HP["weight_decay"])


def run_config(task: str, **blocks) -> config_lib.RunConfig:
    config = config_lib.run_config(task, model="tiny", mesh="cpu", batch_size=BATCH)
    config.num_train_steps = TOTAL
    config.optim.update(OPTIM)
    config.data.update(target_frames=FRAMES)
    for name, values in blocks.items():
        config[name].update(values)
    return config_lib.read(config, hardware.HOST)


def spectrograms(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((BATCH, FRAMES, 128)).astype(np.float32)


# ---------------------------------------------------------------------------- decay groups


def release_flags(cfg, task: str, classes: int = CLASSES_OF_AUDIOSET) -> dict:
    """Our parameter tree of 1.0 where the release's rule decays, 0.0 where it does not,
    decided on the release's names and shapes and carried over by its name mapping."""
    shapes = release_weights.release_shapes(cfg, decoder=task == "pretrain")
    d = cfg.embed_dim
    if task == "finetune":
        shapes |= {"fc_norm.weight": (d,), "fc_norm.bias": (d,)}
        shapes |= {"head.weight": (classes, d), "head.bias": (classes,)}
    flags = {k: np.broadcast_to(np.float32(release_decays(k, v)), v) for k, v in shapes.items()}
    tree = {"encoder": release_weights.encoder_params(flags, cfg)}
    if task == "pretrain":
        return tree | {"decoder": release_weights.decoder_params(flags, cfg)}
    return tree | release_weights.head_params(flags)


SHIPPED = {"pretrain": "configs/pretrain_as2m.py", "finetune": "configs/finetune_as2m.py"}


def base_params(task: str, **optim_fields):
    """The parameter shapes of the shipped base-model config of ``task``, and its task."""
    config = config_lib.load_file(SHIPPED[task])
    config.optim.update(optim_fields)
    model = train_lib.make_task(config_lib.read(config, hardware.HOST))
    boxed = jax.eval_shape(model.init_params, jax.random.PRNGKey(0))
    return nn.meta.unbox(boxed), model


@pytest.mark.parametrize("task", ["pretrain", "finetune"])
def test_weight_decay_spares_what_the_release_states_on_the_base_model(task):
    params, model = base_params(task)
    flags = release_flags(model.config.model, task)
    assert jax.tree.structure(flags) == jax.tree.structure(params)
    expected = []
    for path, flag in jax.tree_util.tree_leaves_with_path(flags):
        assert flag.min() == flag.max()  # one rule per tensor
        if flag.flat[0] == 0:
            expected.append("/".join(optim.path_names(path)))
    exempt = optim.exempt_from_decay(params, model.optim_cfg)
    assert exempt == expected
    # per block: 5 linear biases and 3 norms' scales and biases; the patch bias and the
    # context norm; and the decoder's 7 biases, or fc_norm's two tensors and the head's bias
    assert len(exempt) == 12 * 11 + 3 + (7 if task == "pretrain" else 3)
    assert "encoder/cls_token" not in exempt and "encoder/blocks_0/attn/norm/scale" in exempt


def test_weight_decay_options_name_what_they_change():
    params, model = base_params("pretrain", decay_everything=True)
    assert optim.exempt_from_decay(params, model.optim_cfg) == []
    params, model = base_params("pretrain", no_decay=("cls_token",))
    default = optim.exempt_from_decay(params, optim.OptimConfig())
    assert optim.exempt_from_decay(params, model.optim_cfg) == sorted(
        [*default, "encoder/cls_token"]
    )
    params, model = base_params("pretrain", no_decay=("cls_tokens",))
    with pytest.raises(ValueError, match=r"optim.no_decay names no parameter.*cls_tokens"):
        model.optimizer(params)


# ---------------------------------------------------------------------------- pretraining

EMA = dict(ema_decay=0.5, ema_end_decay=0.9, ema_anneal_end_step=40)


@pytest.mark.parametrize("u", [3, 30], ids=["in-warmup", "after-warmup"])
def test_one_pretraining_update_equals_the_float64_oracle(u):
    run = run_config(
        "pretrain",
        mask=dict(mask_length=3, clone_batch=3),
        pretrain=dict(average_top_k_layers=2, **EMA),
    )
    student_state = ref.state_dict_numpy(
        ref.randomize_(ref.ReleaseModel(**SIZES, decoder_layers=2), seed=1)
    )
    teacher_state = ref.state_dict_numpy(ref.randomize_(ref.ReleaseModel(**SIZES), seed=2))
    spec = spectrograms(3)

    # The step's masks and decoder noise are inputs to the release's loss, drawn as ours are.
    mask_key, noise_key, _ = jax.random.split(step_keys(run, u), 3)
    kept, masked = masking.clone_masks(mask_key, BATCH, (8, 8), run.mask)
    noise = run.pretrain.mask_noise_std * jax.random.normal(noise_key, (*masked.shape, 64))

    student = float64_model(student_state, **SIZES, decoder_layers=2)
    teacher = float64_model(teacher_state, **SIZES)
    loss = ref.pretraining_objective(
        student, teacher, torch.from_numpy(spec).double(),
        torch.from_numpy(np.asarray(kept)).long(), torch.from_numpy(np.asarray(masked)),
        torch.from_numpy(np.asarray(noise)).double(), 3, 2, run.pretrain.cls_loss,
        run.pretrain.utterance_rows,
    )  # fmt: skip
    grads, norm = clipped(gradients(student, loss), run.optim.clip_norm)
    assert norm > run.optim.clip_norm  # the clipping is part of the check
    params = {k: np.asarray(v, np.float64) for k, v in student_state.items() if k in grads}
    mu, nu = prior_moments(grads, seed=5)
    lr = release_lr(u, run.optim.lr, run.optim.min_lr, WARMUP, TOTAL)
    new_params, new_mu, new_nu = adamw(params, grads, mu, nu, u, lambda _: lr, HP)
    d = release_ema_decay(u + 1, EMA["ema_decay"], EMA["ema_end_decay"], 40)
    new_teacher = {
        k: d * np.asarray(v, np.float64) + (1 - d) * new_params[k]
        for k, v in teacher_state.items()
        if k in new_params
    }

    cfg = run.model
    ours = lambda s: {
        "encoder": release_weights.encoder_params(s, cfg),
        "decoder": release_weights.decoder_params(s, cfg),
    }
    params, teacher = ours(student_state), release_weights.encoder_params(teacher_state, cfg)
    batch = {"spectrogram": spec, "frames": np.full(BATCH, FRAMES, np.int32)}
    after = one_step(run, u, params, teacher, ours(mu), ours(nu), batch)

    assert int(after.step) == u + 1
    assert_within_update(after.params, ours(new_params), params, "params")
    moments = adam_moments(after.opt_state)
    assert_within_update(moments["mu"], ours(new_mu), ours(mu), "mu")
    assert_within_update(moments["nu"], ours(new_nu), ours(nu), "nu")
    new_teacher = release_weights.encoder_params(new_teacher, cfg)
    assert_within_update(after.teacher, new_teacher, teacher, "teacher")


# ---------------------------------------------------------------------------- fine-tuning

CLASSES = CLASSES_OF_AUDIOSET  # with AudioSet's loss: BCE summed / the mixed labels' sum
MIXUP = dict(mixup_alpha=0.8, mixup_prob=1.0, mask_ratio=0.0, loss="bce_per_label")
# A floor above block 0's scaled peak (0.5 · 0.65²): that group's rate is constant.
FINETUNE_OPTIM = dict(layer_decay=0.65, min_lr=0.25)


def release_layer_scale(name: str, depth: int, layer_decay: float) -> float:
    """Block i's lr scale layer_decay^(depth − i); every other tensor 1.0 (the release's)."""
    if name.startswith("blocks."):
        return layer_decay ** (depth - int(name.split(".")[1]))
    return 1.0


def mixup_weight(run: config_lib.RunConfig, u: int) -> float:
    """λ of our step ``u``'s mixup, an input to the release's loss as its draw would be."""
    aug_key, _ = jax.random.split(step_keys(run, u))
    _, mix_key, _ = jax.random.split(aug_key, 3)
    use_key, beta_key = jax.random.split(mix_key)
    assert float(jax.random.uniform(use_key)) < run.finetune.mixup_prob
    return float(jax.random.beta(beta_key, run.finetune.mixup_alpha, run.finetune.mixup_alpha))


@pytest.mark.parametrize("u", [3, 30], ids=["in-warmup", "after-warmup"])
def test_one_finetuning_update_equals_the_float64_oracle(u):
    run = run_config(
        "finetune",
        model=dict(drop_path=0.0),
        data=dict(dataset="audioset"),
        finetune=MIXUP,
        optim=FINETUNE_OPTIM,
    )
    sizes = dict(**SIZES, num_classes=CLASSES)
    state = ref.state_dict_numpy(ref.randomize_(ref.ReleaseModel(**sizes), seed=1))
    spec = spectrograms(3)
    labels = (np.random.default_rng(4).random((BATCH, CLASSES)) < 0.02).astype(np.float32)
    labels[:, 0] = 1.0  # every clip has a label

    lam = mixup_weight(run, u)
    mix = lambda x: lam * x + (1 - lam) * x.flip(0)
    model = float64_model(state, **sizes)
    targets = mix(torch.from_numpy(labels).double())
    logits = model.logits(mix(torch.from_numpy(spec).double()))
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / targets.sum()
    grads, norm = clipped(gradients(model, loss), run.optim.clip_norm)
    assert norm > run.optim.clip_norm
    params = {k: np.asarray(v, np.float64) for k, v in state.items() if k in grads}
    mu, nu = prior_moments(grads, seed=5)

    def lr_of(name):
        peak = run.optim.lr * release_layer_scale(name, 2, run.optim.layer_decay)
        return release_lr(u, peak, run.optim.min_lr, WARMUP, TOTAL)

    assert lr_of("blocks.0.norm1.weight") == pytest.approx(0.5 * 0.65**2)  # the floor
    new_params, new_mu, new_nu = adamw(params, grads, mu, nu, u, lr_of, HP)

    cfg = run.model
    ours = lambda s: {
        "encoder": release_weights.encoder_params(s, cfg),
        **release_weights.head_params(s),
    }
    before = ours(state)
    batch = {"spectrogram": spec, "frames": np.full(BATCH, FRAMES, np.int32), "labels": labels}
    after = one_step(run, u, before, None, ours(mu), ours(nu), batch)

    assert_within_update(after.params, ours(new_params), before, "params")
    moments = adam_moments(after.opt_state)
    assert_within_update(moments["mu"], ours(new_mu), ours(mu), "mu")
    assert_within_update(moments["nu"], ours(new_nu), ours(nu), "nu")
