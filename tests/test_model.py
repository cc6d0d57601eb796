"""The Flax model against the release's structure and an independent PyTorch re-implementation."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from asda_jax import hardware, release_weights, sharding
from asda_jax import model as model_lib
from asda_jax.kernels import decoder as decoder_kernel
from asda_jax.kernels import mlp as mlp_kernel
from asda_jax.testing import torch_reference as ref

SMALL = dict(embed_dim=64, depth=2, num_heads=4, max_time_patches=64)


def shapes(tree):
    return jax.tree.map(lambda x: tuple(x.shape), tree)


def count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def torch_model(seed=0, **kw) -> ref.ReleaseModel:
    torch.manual_seed(seed)
    return ref.randomize_(ref.ReleaseModel(**kw), seed).eval()


# --------------------------------------------------------------------- structure


def test_base_encoder_has_the_release_structure_and_parameter_count():
    cfg = model_lib.preset("base")
    ours = model_lib.abstract_params(model_lib.Encoder(cfg), (1, 1024, 128))
    release = ref.ReleaseModel()  # the release's ViT-B with its module names
    mapped = release_weights.encoder_params(ref.state_dict_numpy(release), cfg)
    assert shapes(ours) == shapes(mapped)
    assert count(ours) == 92_364_288  # trainable encoder of the release (positions excluded)
    assert ours["blocks_0"]["attn"]["qk"]["kernel"].shape == (768, 4, 12, 64)
    assert ours["blocks_0"]["mlp"]["fc1"]["kernel"].shape == (768, 2688)


def test_base_decoder_has_the_release_structure_and_parameter_count():
    cfg = model_lib.preset("base")
    ours = model_lib.abstract_params(model_lib.Decoder(cfg), (1, 64, 8, 768))
    release = ref.ReleaseModel(depth=0, decoder_layers=6)
    mapped = release_weights.decoder_params(ref.state_dict_numpy(release), cfg)
    assert shapes(ours) == shapes(mapped)
    assert count(ours) == 2_585_856


def test_positional_table_layout():
    table = model_lib.sincos_table(768, 8, 768)
    assert table.shape == (6144, 768) and table.dtype == np.float32
    # Row t·8 + f: the first half encodes the frequency patch f, the second the time t.
    np.testing.assert_array_equal(table[1, 384:], table[0, 384:])  # f 0 → 1: time half kept
    np.testing.assert_array_equal(table[8, :384], table[0, :384])  # t 0 → 1: freq half kept
    assert (table[1, :384] != table[0, :384]).sum() > 192  # every sine and most cosines move
    assert (table[8, 384:] != table[0, 384:]).sum() > 192
    expected = ref.sincos_positions(768, 8, 768)[0].numpy()
    # float32 pow differs by an ulp between libraries; times positions up to 767 → ≤ 1e-4
    np.testing.assert_allclose(table, expected, atol=1e-4)
    cfg = model_lib.preset("base")
    np.testing.assert_array_equal(model_lib.sincos_positions(cfg, 64), table[:512])


# --------------------------------------------------------------------- parity with PyTorch


def _ours_from_torch(torch_model, cfg):
    state = ref.state_dict_numpy(torch_model)
    return {"params": jax.tree.map(jnp.asarray, release_weights.encoder_params(state, cfg))}


@pytest.mark.parametrize("padded", [False, True])
def test_encoder_matches_pytorch_reimplementation(padded):
    cfg = model_lib.ModelConfig(**SMALL)
    tm = torch_model(dim=64, depth=2, num_heads=4, max_time_patches=64)
    spec = np.random.default_rng(0).standard_normal((2, 160, 128)).astype(np.float32)
    lengths = np.array([160, 96])  # 10 and 6 time patches
    padding = None
    if padded:
        patch_valid = np.arange(80)[None] < (lengths // 16 * 8)[:, None]
        padding = torch.from_numpy(~np.concatenate([np.ones((2, 1), bool), patch_valid], 1))
    with torch.no_grad():
        tokens, layers = tm(torch.from_numpy(spec), padding)
    out = model_lib.Encoder(cfg).apply(
        _ours_from_torch(tm, cfg), spec, jnp.asarray(lengths) if padded else None
    )
    valid = np.ones((2, 81), bool) if padding is None else ~padding.numpy()
    np.testing.assert_allclose(np.asarray(out.tokens)[valid], tokens.numpy()[valid], atol=1e-5)
    for ours, theirs in zip(out.layer_results, layers, strict=True):
        np.testing.assert_allclose(np.asarray(ours)[valid], theirs.numpy()[valid], atol=1e-5)


def test_classifier_and_decoder_match_pytorch_reimplementation():
    cfg = model_lib.ModelConfig(**SMALL, decoder_dim=64, decoder_layers=2, decoder_groups=4)
    tm = torch_model(
        dim=64, depth=2, num_heads=4, max_time_patches=64, decoder_layers=2,
        decoder_groups=4, decoder_grid=(10, 8), num_classes=7,
    )  # fmt: skip
    state = ref.state_dict_numpy(tm)
    spec = np.random.default_rng(1).standard_normal((2, 160, 128)).astype(np.float32)
    params = {
        "encoder": release_weights.encoder_params(state, cfg),
        **release_weights.head_params(state),
    }
    logits = model_lib.Classifier(cfg, num_classes=7).apply({"params": params}, spec)
    with torch.no_grad():
        expected = tm.logits(torch.from_numpy(spec)).numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-5)

    tokens = np.random.default_rng(2).standard_normal((2, 80, 64)).astype(np.float32)
    decoded = model_lib.Decoder(cfg).apply(
        {"params": release_weights.decoder_params(state, cfg)}, tokens.reshape(2, 10, 8, 64)
    )
    with torch.no_grad():
        expected = tm.image.decoder(torch.from_numpy(tokens)).numpy()
    np.testing.assert_allclose(decoded, expected, atol=1e-5)


# --------------------------------------------------------------------- variable length


def _tiny_encoder(run: model_lib.Execution | None = None, **overrides):
    cfg = model_lib.preset("tiny", **overrides)
    encoder = model_lib.Encoder(cfg, run=run or model_lib.Execution())
    # The parameters do not depend on the input's length: one patch row suffices.
    variables = nn.meta.unbox(encoder.init(jax.random.key(0), jnp.zeros((1, 16, 128))))
    return cfg, encoder, variables


@pytest.mark.parametrize("impl", ["taps", "per_device"])
def test_grouped_conv_forms_equal_xla_grouped_conv_with_gradients(impl):
    """Under an 8-device data-parallel mesh (where ``per_device`` shard_maps)."""
    x = jax.random.normal(jax.random.key(0), (8, 6, 4, 16))
    kernel = 0.3 * jax.random.normal(jax.random.key(1), (3, 3, 4, 24))
    weights = jax.random.normal(jax.random.key(2), (8, 6, 4, 24))
    mesh = sharding.make_mesh(sharding.DATA_PARALLEL)
    with sharding.activate(mesh):
        results = {
            form: jax.jit(
                jax.value_and_grad(
                    lambda x, k, f=form: jnp.sum(model_lib.grouped_conv(x, k, 4, f) * weights),
                    argnums=(0, 1),
                )
            )(x, kernel)
            for form in ("xla", impl)
        }
    (value_xla, grads_xla), (value, grads) = results["xla"], results[impl]
    np.testing.assert_allclose(value, value_xla, rtol=1e-5)
    for a, b in zip(grads, grads_xla, strict=True):  # kernel sums over 8 examples
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _decoder_value_and_grads(cfg, run, params, grid, weights):
    """Σ weights · Decoder(grid) and its gradients (params, grid), jitted under an
    8-device data-parallel mesh (where the Pallas form shard_maps over the examples)."""
    decoder = model_lib.Decoder(cfg, run)
    loss = lambda p, x: jnp.sum(decoder.apply({"params": p}, x) * weights)
    with sharding.activate(sharding.make_mesh(sharding.DATA_PARALLEL)):
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, grid)


PALLAS_DECODER = model_lib.Execution(decoder_conv_impl="pallas", interpret_kernels=True)


def test_the_pallas_decoder_kernel_equals_the_release_decoder_with_gradients():
    """The whole block (conv, LayerNorm, GELU, residual) in one interpreted Pallas TPU
    kernel against the PyTorch decoder, forward and backward, on a 10 × 8 grid (time
    and frequency taps at every edge)."""
    cfg = model_lib.ModelConfig(**SMALL, decoder_dim=64, decoder_layers=2, decoder_groups=4)
    tm = torch_model(
        dim=64, depth=2, num_heads=4, max_time_patches=64, decoder_layers=2,
        decoder_groups=4, decoder_grid=(10, 8),
    )  # fmt: skip
    state = ref.state_dict_numpy(tm)
    params = release_weights.decoder_params(state, cfg)
    rng = np.random.default_rng(4)
    tokens = rng.standard_normal((16, 80, 64)).astype(np.float32)  # two examples per device
    weights = rng.standard_normal((16, 80, 64)).astype(np.float32)
    value, (d_params, d_grid) = _decoder_value_and_grads(
        cfg, PALLAS_DECODER, params, tokens.reshape(16, 10, 8, 64), weights
    )
    torch_tokens = torch.from_numpy(tokens).requires_grad_()
    expected = (tm.image.decoder(torch_tokens) * torch.from_numpy(weights)).sum()
    expected.backward()
    assert float(value) == pytest.approx(float(expected.detach()), rel=1e-5)
    np.testing.assert_allclose(d_grid.reshape(16, 80, 64), torch_tokens.grad.numpy(), atol=1e-4)
    torch_grads = {k: p.grad.numpy() for k, p in tm.named_parameters() if p.grad is not None}
    torch_grads = {k: torch_grads.get(k, np.zeros(v.shape, np.float32)) for k, v in state.items()}
    want = release_weights.decoder_params(torch_grads, cfg)
    for path, got in jax.tree_util.tree_leaves_with_path(d_params):  # over examples, devices
        exp = want
        for key in path:
            exp = exp[key.key]
        scale = np.abs(exp).max()
        np.testing.assert_allclose(got / scale, exp / scale, atol=1e-5, err_msg=str(path))


@pytest.mark.parametrize("chip", ["cpu", "v5p"])  # one TensorCore per device, and two
def test_the_pallas_decoder_kernel_equals_xla_where_the_first_block_changes_width(chip):
    """decoder_dim ≠ embed_dim: the first block has no residual, the second 8 channels
    per group (one float32 tile of rows). On a megacore chip's form the backward splits
    each device's examples over two cores, each with its own weight gradients."""
    cfg = model_lib.preset("tiny", decoder_dim=32)
    pallas = dataclasses.replace(PALLAS_DECODER, chip=chip, dtype="float32")
    grid = jax.random.normal(jax.random.key(0), (8, 8, 4, 64))
    weights = jax.random.normal(jax.random.key(1), (8, 32, 64))
    params = model_lib.Decoder(cfg).init(jax.random.key(2), grid)["params"]
    params = jax.tree.map(lambda p: 3.0 * p, params)  # LayerNorm and GELU far from linear
    xla = model_lib.Execution(decoder_conv_impl="xla")
    (value, grads), (value_xla, grads_xla) = (
        _decoder_value_and_grads(cfg, run, params, grid, weights) for run in (pallas, xla)
    )
    assert float(value) == pytest.approx(float(value_xla), rel=1e-5)
    for got, exp in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_xla), strict=True):
        np.testing.assert_allclose(got, exp, rtol=1e-4, atol=1e-4 * np.abs(exp).max())


@pytest.mark.parametrize("max_rows", [None, 16])  # one block per example; 16 + 10 rows
def test_the_pallas_mlp_kernel_equals_xla_with_gradients(max_rows, monkeypatch):
    """fc1, GELU and fc2 in one interpreted Pallas TPU kernel against the XLA MLP,
    forward and backward, under an 8-device mesh with two examples per device (the
    weight gradients summed over examples and devices). In blocks of 16 rows the last
    block of the 26 runs past the sequence, where interpretation leaves garbage."""
    if max_rows:
        monkeypatch.setattr(mlp_kernel, "MAX_ROWS", max_rows)
    cfg = model_lib.preset("tiny")
    x = jax.random.normal(jax.random.key(0), (16, 26, cfg.embed_dim))
    weights = jax.random.normal(jax.random.key(1), (16, 26, cfg.embed_dim))
    xla = model_lib.Execution(mlp_impl="xla")
    params = model_lib.Mlp(cfg, xla).init(jax.random.key(2), x)["params"]
    params = jax.tree.map(lambda p: 3.0 * p, params)  # GELU far from linear

    def value_and_grads(run):
        mlp = model_lib.Mlp(cfg, run)
        loss = lambda p, x: jnp.sum(mlp.apply({"params": p}, x) * weights)
        with sharding.activate(sharding.make_mesh(sharding.DATA_PARALLEL)):
            return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)

    pallas = model_lib.Execution(mlp_impl="pallas", interpret_kernels=True)
    (value, grads), (value_xla, grads_xla) = map(value_and_grads, (pallas, xla))
    assert float(value) == pytest.approx(float(value_xla), rel=1e-5)
    for got, exp in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_xla), strict=True):
        np.testing.assert_allclose(got, exp, rtol=1e-4, atol=1e-5 * np.abs(exp).max())


def test_the_kernels_backward_split_over_two_cores_sums_to_one_cores():
    """The per-core weight gradients summed after the call equal one core's sums over
    every example, for both kernels; an odd batch stays on one core."""
    keys = jax.random.split(jax.random.key(0), 8)
    x = jax.random.normal(keys[0], (4, 24, 64))
    w1, w2 = jax.random.normal(keys[1], (64, 96)) / 8, jax.random.normal(keys[2], (96, 64)) / 8
    b1, b2 = jax.random.normal(keys[3], (96,)), jax.random.normal(keys[4], (64,))
    grid_x = jax.random.normal(keys[5], (4, 64, 48))  # a 6 × 8 grid
    kernel = jax.random.normal(keys[6], (3, 3, 16, 64)) / 12
    bias = jax.random.normal(keys[7], (64,))

    def grads(cores, examples=4):
        vmem = hardware.chip("v5p").kernel_vmem_bytes
        mlp = lambda *a: mlp_kernel.mlp(*a, vmem_bytes=vmem, cores=cores, interpret=True).sum()
        conv = lambda *a: decoder_kernel.conv_block(
            *a, (6, 8), groups=4, cores=cores, interpret=True
        ).sum()
        return (
            jax.grad(mlp, argnums=(1, 2, 3, 4))(x[:examples], w1, b1, w2, b2),
            jax.grad(conv, argnums=(1, 2))(grid_x[:examples], kernel, bias),
        )

    for got, want in zip(jax.tree.leaves(grads(2)), jax.tree.leaves(grads(1)), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert mlp_kernel.cores_splitting(3, 2) == 1 and mlp_kernel.cores_splitting(4, 2) == 2
    # three examples, or one: the decoder keeps them on one core (the same program); the
    # MLP gives each core one of each example's two blocks of 16 rows (the second runs
    # 8 rows past the sequence)
    assert mlp_kernel.core_split(3, 24, 2) == mlp_kernel.CoreSplit(2, 3, 1, 16, by_rows=True)
    for examples in (3, 1):
        (mlp_2, conv_2), (mlp_1, conv_1) = grads(2, examples), grads(1, examples)
        for got, want in zip(jax.tree.leaves(mlp_2), jax.tree.leaves(mlp_1), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
        for got, want in zip(jax.tree.leaves(conv_2), jax.tree.leaves(conv_1), strict=True):
            np.testing.assert_array_equal(got, want)


def test_the_mlp_kernel_splits_one_example_per_device_over_the_cores_by_row_blocks():
    split = mlp_kernel.core_split
    assert split(4, 513, 2) == mlp_kernel.CoreSplit(2, 2, 2, 264, by_rows=False)
    assert split(1, 513, 2) == mlp_kernel.CoreSplit(2, 1, 1, 264, by_rows=True)  # AS-20K
    assert split(1, 1213, 2) == mlp_kernel.CoreSplit(2, 1, 2, 304, by_rows=True)  # 3 → 4 blocks
    assert split(1, 513, 1) == mlp_kernel.CoreSplit(1, 1, 2, 264, by_rows=False)
    assert split(1, 7, 2) == mlp_kernel.CoreSplit(1, 1, 1, 7, by_rows=False)  # too short
    for examples, length in ((1, 513), (3, 1213), (1, 65), (2, 9)):
        s = split(examples, length, 2)
        assert s.cores * s.examples == examples * (s.cores if s.by_rows else 1)
        blocks = s.blocks * (s.cores if s.by_rows else 1)
        assert (blocks - 1) * s.rows < length <= blocks * s.rows  # no block wholly outside
        assert s.rows % 8 == 0 or s.rows == length


def test_the_kernels_weight_gradients_reach_fsdp_shards_by_reduce_scatter():
    """Under a (data 2, fsdp 4) mesh both kernels' weight gradients equal XLA's forms',
    leave their per-device programs reduce-scattered over ``fsdp`` (each device gets
    its own shard of the parameter's gradient, as the parameter is laid out) and
    all-reduced only over ``data``; no whole weight gradient is all-reduced."""
    cfg = model_lib.preset("tiny")  # embed 192 (48 per fsdp rank), decoder 64 (16)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    x = jax.random.normal(jax.random.key(0), (8, 12, cfg.embed_dim))
    grid = x.reshape(8, 4, 3, cfg.embed_dim)
    weights = jax.random.normal(jax.random.key(1), x.shape)

    def grads_and_program(module_class, inputs, **forms):
        run = model_lib.Execution(interpret_kernels=True, dtype="float32", **forms)
        module = module_class(cfg, run)
        boxed = module.init(jax.random.key(2), inputs)["params"]
        shardings = sharding.logical_shardings(boxed, mesh)
        params = jax.device_put(nn.unbox(boxed), shardings)
        loss = lambda p: jnp.sum(module.apply({"params": p}, inputs).reshape(x.shape) * weights)
        with sharding.activate(mesh):
            step = jax.jit(jax.grad(loss))
            # finished before anything else is dispatched (model.Execution.interpret_kernels)
            return jax.block_until_ready(step(params)), step.lower(params).as_text(), shardings

    def kernels_layouts(shardings, kernels_modules):  # the specs of what a kernel computes
        leaves = jax.tree_util.tree_leaves_with_path(shardings)
        return [s.spec for path, s in leaves if path[0].key.startswith(kernels_modules)]

    everywhere, data_only = "[[0, 1, 2, 3, 4, 5, 6, 7]]", "[[0, 4], [1, 5], [2, 6], [3, 7]]"
    for module_class, inputs, kernel, xla, kernels_modules in (
        (model_lib.Mlp, x, {"mlp_impl": "pallas"}, {"mlp_impl": "xla"}, "fc"),
        # the decoder's final projection is XLA's, partitioned after lowering
        (model_lib.Decoder, grid, {"decoder_conv_impl": "pallas"}, {"decoder_conv_impl": "xla"},
         "blocks_"),
    ):  # fmt: skip
        got, program, shardings = grads_and_program(module_class, inputs, **kernel)
        want, _, _ = grads_and_program(module_class, inputs, **xla)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * np.abs(w).max())
        layouts = kernels_layouts(shardings, kernels_modules)
        sharded = sum("fsdp" in tuple(spec) for spec in layouts)
        reductions = [line for line in program.splitlines() if "stablehlo.all_reduce" in line]
        assert sharded > 0 and program.count("stablehlo.reduce_scatter") == sharded
        assert sum(data_only in line for line in reductions) == sharded  # then over data
        whole = sum(everywhere in line for line in reductions)  # unsharded biases
        assert whole == len(layouts) - sharded == len(reductions) - sharded


def test_mlp_kernel_blocks_of_rows_cover_the_sequence_in_whole_tiles():
    for length, rows in [(103, 103), (512, 512), (513, 264), (6145, 480)]:
        assert mlp_kernel.rows_per_block(length) == rows
        blocks = -(-length // rows)
        assert rows <= mlp_kernel.MAX_ROWS and (blocks - 1) * rows < length <= blocks * rows


def test_the_pallas_forms_are_tpu_only_and_small_vmem_chips_keep_the_xla_mlp():
    for field in ("decoder_conv_impl", "mlp_impl", "attention_impl"):
        with pytest.raises(ValueError, match=r"pallas.* is a TPU kernel"):
            kernel = "pallas_splash" if field == "attention_impl" else "pallas"
            model_lib.Execution(chip="h100", **{field: kernel}).validate()
    with pytest.raises(ValueError, match="'cudnn' needs a GPU"):
        model_lib.Execution(chip="v5e", attention_impl="cudnn").validate()
    v5e = model_lib.Execution(chip="v5e").validate()
    assert (v5e.decoder_conv, v5e.mlp) == ("pallas", "pallas")
    # the MLP kernel holds the weights and their gradients: chips with little VMEM (v4's
    # 16 MiB, and a TPU of a kind not listed) keep XLA's MLP
    for chip in ("v4", "tpu"):
        run = model_lib.Execution(chip=chip).validate()
        assert (run.decoder_conv, run.mlp) == ("pallas", "xla"), chip
    assert hardware.chip("v5e").kernel_vmem_bytes > 2 * hardware.chip("v4").vmem_bytes


def test_padded_batch_equals_each_clip_alone():
    _, encoder, variables = _tiny_encoder()
    rng = np.random.default_rng(3)
    five, ten = 498, 998  # fbank frames of 5 s and 10 s clips
    clips = [rng.standard_normal((n, 128)).astype(np.float32) for n in (five, ten)]
    batch = np.zeros((2, ten, 128), np.float32)
    batch[0, :five], batch[1] = clips
    apply = jax.jit(encoder.apply)
    together = apply(variables, batch, jnp.array([five, ten]))
    for i, clip in enumerate(clips):
        alone = apply(variables, clip[None])
        n = alone.tokens.shape[1]
        np.testing.assert_allclose(together.tokens[i, :n], alone.tokens[0], atol=1e-5)
        for t, a in zip(together.layer_results, alone.layer_results, strict=True):
            np.testing.assert_allclose(t[i, :n], a[0], atol=1e-5)
    assert n == 1 + 62 * 8


def test_two_minute_clip_runs_and_longer_is_a_clear_error():
    cfg, encoder, variables = _tiny_encoder()
    frames = cfg.max_time_patches * cfg.patch_size  # 12288 frames ≈ 122.9 s
    out = jax.jit(encoder.apply)(variables, jnp.ones((1, frames, 128)))
    assert out.tokens.shape == (1, 1 + 768 * 8, cfg.embed_dim)
    assert np.isfinite(np.asarray(out.tokens)).all()
    with pytest.raises(ValueError, match="positional table holds 768"):
        encoder.apply(variables, jnp.ones((1, frames + 16, 128)))


def test_mean_pooling_ignores_padding():
    out = model_lib.EncoderOutput(
        tokens=jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3),
        layer_results=(),
        mask=jnp.array([[True, True, True, True], [True, True, False, False]]),
    )
    pooled = model_lib.pool(out, "mean")
    np.testing.assert_allclose(pooled[0], out.tokens[0, 1:].mean(0))
    np.testing.assert_allclose(pooled[1], out.tokens[1, 1])
    np.testing.assert_allclose(model_lib.pool(out, "cls"), out.tokens[:, 0])


# --------------------------------------------------------------------- options


def test_attention_maps_are_captured_without_changing_outputs():
    cfg, encoder, variables = _tiny_encoder()
    spec = jnp.ones((2, 64, 128))
    plain = encoder.apply(variables, spec)
    out, state = encoder.apply(variables, spec, mutable=["intermediates"])
    np.testing.assert_allclose(out.tokens, plain.tokens, atol=1e-6)
    maps = state["intermediates"]["blocks_0"]["attn"]["attention_maps"][0]
    assert maps.shape == (2, 2, cfg.num_heads, 33, 33)  # (B, branches, H, T, T)
    np.testing.assert_allclose(maps.sum(-1), 1.0, atol=1e-5)


def test_drop_path_rates_rise_with_depth():
    _, encoder, variables = _tiny_encoder(drop_path=0.5, depth=4)
    rates = [b.drop_path for b in encoder.bind(variables).blocks]
    np.testing.assert_allclose(rates, [0.0, 1 / 6, 2 / 6, 0.5])


def test_drop_path_is_per_example_and_only_in_training():
    """One block at rate 0.5 on 64 copies of one clip: in training each copy drops or keeps
    each of the block's two branches whole, so the copies take at most 2 × 2 distinct
    outputs, and at least two of them (all 64 alike has probability 2·(1/4)^64); out of
    training the dropout key changes nothing."""
    _, encoder, variables = _tiny_encoder(drop_path=0.5, depth=1)
    spec = jnp.broadcast_to(jax.random.normal(jax.random.key(1), (1, 64, 128)), (64, 64, 128))
    evaluation = encoder.apply(variables, spec).tokens
    keyed = encoder.apply(variables, spec, rngs={"dropout": jax.random.key(2)}).tokens
    np.testing.assert_array_equal(keyed, evaluation)
    train = encoder.apply(variables, spec, train=True, rngs={"dropout": jax.random.key(2)})
    outputs = np.asarray(train.tokens).reshape(64, -1)
    distinct = np.unique(outputs.round(5), axis=0)
    assert 2 <= len(distinct) <= 4  # element-wise dropout would make 64 distinct rows
    assert not np.allclose(outputs, np.asarray(evaluation).reshape(64, -1), atol=1e-5)


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch"])
def test_remat_changes_nothing_numerically(policy):
    cfg, encoder, variables = _tiny_encoder()
    remat = model_lib.Encoder(cfg, run=model_lib.Execution(remat_policy=policy))
    spec = jax.random.normal(jax.random.key(1), (2, 64, 128))

    def loss(module):
        return lambda v: jnp.sum(module.apply(v, spec).tokens ** 2)

    g_ref = jax.grad(loss(encoder))(variables)
    g = jax.jit(jax.grad(loss(remat)))(variables)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5)


def test_bfloat16_compute_keeps_float32_parameters():
    _, encoder, variables = _tiny_encoder(run=model_lib.Execution(dtype="bfloat16"))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
    out = encoder.apply(variables, jnp.ones((1, 64, 128)))
    assert out.tokens.dtype == jnp.bfloat16
    f32 = model_lib.Encoder(model_lib.preset("tiny")).apply(variables, jnp.ones((1, 64, 128)))
    np.testing.assert_allclose(out.tokens.astype(jnp.float32), f32.tokens, atol=0.1)


@pytest.mark.parametrize("variant", ["diff", "plain"])
def test_other_attention_variants_build_and_run(variant):
    cfg, encoder, variables = _tiny_encoder(attention=variant)
    out = encoder.apply(variables, jnp.ones((2, 64, 128)), jnp.array([64, 32]))
    assert out.tokens.shape == (2, 33, cfg.embed_dim)
    if variant == "diff":
        params = variables["params"]
        assert params["blocks_1"]["attn"]["lambda_q1"].shape == (cfg.head_dim,)
        assert params["blocks_1"]["attn"]["v"]["kernel"].shape == (64, 2, 32)  # 2 heads × 2d


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(num_heads=5), "divide into num_heads"),
        (dict(attention="linear"), "attention must be one of"),
        (dict(attention="diff", num_heads=3, embed_dim=96), "num_heads must be even"),
        (dict(decoder_groups=5), "decoder_groups"),
    ],
)
def test_invalid_model_configs_are_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        model_lib.preset("tiny", **overrides)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(remat_policy="some"), "remat_policy"),
        (dict(attention_impl="flash9"), "attention_impl"),
        (dict(dtype="int8"), "dtype"),
        (dict(decoder_conv_impl="fft"), "decoder_conv_impl"),
        (dict(chip="ipu"), "unknown chip"),
    ],
)
def test_invalid_executions_are_rejected(fields, message):
    with pytest.raises(ValueError, match=message):
        model_lib.Execution(**fields).validate()


def test_execution_takes_the_chips_forms_unless_told():
    cpu, tpu = model_lib.Execution(chip="cpu"), model_lib.Execution(chip="v5e")
    assert (cpu.compute_dtype, cpu.decoder_conv) == (jnp.float32, "taps")
    assert (tpu.compute_dtype, tpu.decoder_conv) == (jnp.bfloat16, "pallas")
    assert model_lib.Execution(chip="h100").decoder_conv == "per_device"
    assert model_lib.Execution(chip="gpu").decoder_conv == "per_device"
    told = model_lib.Execution(chip="v5e", dtype="float32", decoder_conv_impl="taps")
    assert (told.compute_dtype, told.decoder_conv) == (jnp.float32, "taps")


def test_wrong_input_shape_is_a_clear_error():
    _, encoder, variables = _tiny_encoder()
    with pytest.raises(ValueError, match=r"expected \(batch, frames, 128\)"):
        encoder.apply(variables, jnp.ones((1, 64, 80)))
