"""Sharding on 8 simulated CPU devices: rules, shardings and equality with one device."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from asda_jax import audio, hardware, sharding
from asda_jax import model as model_lib

MESH_SHAPE = {"data": 2, "fsdp": 2, "tensor": 2}


def test_eight_devices_are_simulated():
    assert jax.device_count() == 8


def test_mesh_fills_one_axis_and_rejects_wrong_sizes():
    mesh = sharding.make_mesh({"data": -1, "fsdp": 2, "tensor": 1})
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    assert sharding.data_parallel_size(mesh) == 8
    with pytest.raises(ValueError, match="needs 12 devices, but 8 are present"):
        sharding.make_mesh({"data": 3, "fsdp": 2, "tensor": 2})
    with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
        sharding.make_mesh((-1, -1, 2))
    single = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    assert single.devices.size == 1


def _classifier_on(mesh, cfg):
    model = model_lib.Classifier(cfg, num_classes=5)
    spec = jnp.zeros((8, 64, 128))
    boxed = jax.eval_shape(model.init, jax.random.key(0), spec)
    shardings = sharding.logical_shardings(boxed, mesh)
    with sharding.activate(mesh):
        variables = jax.jit(model.init, out_shardings=shardings)(jax.random.key(0), spec)
    return model, nn.meta.unbox(variables), shardings


def test_parameters_are_sharded_as_the_rules_say():
    cfg = model_lib.preset("tiny")  # D 64, 4 heads of 16, MLP 224
    mesh = sharding.make_mesh(MESH_SHAPE)
    _, variables, _ = _classifier_on(mesh, cfg)
    block = variables["params"]["encoder"]["blocks_0"]
    expected = {
        ("attn", "qk", "kernel"): (P("fsdp", None, "tensor", None), (32, 4, 2, 16)),
        ("attn", "v", "kernel"): (P("fsdp", "tensor", None), (32, 2, 16)),
        ("attn", "proj", "kernel"): (P("tensor", None, "fsdp"), (2, 16, 32)),
        ("attn", "norm", "scale"): (P("tensor", None), (2, 16)),
        ("mlp", "fc1", "kernel"): (P("fsdp", "tensor"), (32, 112)),
        ("mlp", "fc2", "kernel"): (P("tensor", "fsdp"), (112, 32)),
        ("norm1", "scale"): (P(None), (64,)),
    }
    for path, (spec, shard_shape) in expected.items():
        leaf = block
        for key in path:
            leaf = leaf[key]
        assert leaf.sharding.spec == spec, path
        assert leaf.addressable_shards[0].data.shape == shard_shape, path
    patch = variables["params"]["encoder"]["patch_embed"]["proj"]["kernel"]
    assert patch.sharding.spec == P(None, None, None, "fsdp")


def _loss_and_grads(model, variables, spec, lengths, labels):
    def loss(params):
        logits = model.apply({"params": params}, spec, lengths)
        return jnp.mean((logits - labels) ** 2)

    return jax.jit(jax.value_and_grad(loss))(variables["params"])


def test_forward_and_backward_on_the_mesh_equal_one_device():
    cfg = model_lib.preset("tiny")
    mesh = sharding.make_mesh(MESH_SHAPE)
    model, variables, _ = _classifier_on(mesh, cfg)
    rng = np.random.default_rng(0)
    spec = rng.standard_normal((8, 64, 128)).astype(np.float32)
    lengths = np.array([64, 48, 64, 32, 64, 16, 64, 64])
    labels = rng.standard_normal((8, 5)).astype(np.float32)

    host = jax.device_get(variables)
    one = jax.devices()[0]
    on_one = [jax.device_put(x, one) for x in (spec, lengths, labels)]
    loss_1, grads_1 = _loss_and_grads(model, jax.device_put(host, one), *on_one)

    batch = sharding.batch_sharding(mesh)
    on_mesh = [jax.device_put(x, batch) for x in (spec, lengths, labels)]
    with sharding.activate(mesh):
        loss_8, grads_8 = _loss_and_grads(model, variables, *on_mesh)

    assert len(loss_8.sharding.device_set) == 8
    np.testing.assert_allclose(loss_8, loss_1, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_8), jax.tree.leaves(grads_1), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_pallas_kernel_is_shard_mapped_under_the_mesh():
    cfg = model_lib.preset("tiny")
    pallas = model_lib.Execution(attention_impl="pallas_splash", interpret_kernels=True)
    mesh = sharding.make_mesh(MESH_SHAPE)
    spec = jax.random.normal(jax.random.key(3), (8, 64, 128))
    lengths = jnp.array([64, 48, 64, 32, 64, 16, 64, 64])
    encoder = model_lib.Encoder(cfg)
    variables = nn.meta.unbox(encoder.init(jax.random.key(0), spec))
    expected = encoder.apply(variables, spec, lengths)
    batch = sharding.batch_sharding(mesh)
    with sharding.activate(mesh):
        out = jax.jit(model_lib.Encoder(cfg, run=pallas).apply)(
            variables, jax.device_put(spec, batch), jax.device_put(lengths, batch)
        )
    valid = np.asarray(expected.mask)
    np.testing.assert_allclose(
        np.asarray(out.tokens)[valid], np.asarray(expected.tokens)[valid], atol=1e-5
    )


def test_device_front_end_on_the_mesh_equals_one_device_and_stays_split():
    mesh = sharding.make_mesh({"data": 4, "fsdp": 2, "tensor": 1})
    waves = np.random.default_rng(0).standard_normal((16, 3_280)).astype(np.float32)  # 20 frames
    lengths = np.full(16, 3_280, np.int32)
    lengths[3] = 1_000
    norm = audio.NORM_STATS["audioset"]
    run = jax.jit(
        functools.partial(audio.device_spectrogram, forms=hardware.CPU_FORMS),
        static_argnums=2,
        static_argnames="per_pass",
    )
    one = jax.devices()[0]
    spec_1, frames_1 = run(jax.device_put(waves, one), jax.device_put(lengths, one), norm)
    batch = sharding.batch_sharding(mesh)
    with sharding.activate(mesh):
        args = (jax.device_put(waves, batch), jax.device_put(lengths, batch), norm)
        spec_8, frames_8 = run(*args, per_pass=1)  # two passes on every device
        compiled = run.lower(*args, per_pass=1).compile().as_text()
    assert "all-gather" not in compiled  # each device transforms only its own rows
    assert spec_8.sharding.is_equivalent_to(batch, 3)
    np.testing.assert_array_equal(frames_8, frames_1)
    np.testing.assert_allclose(spec_8, spec_1, atol=1e-5)
