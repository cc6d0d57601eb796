"""Differential attention: NumPy oracles for both forms, and every backend vs the reference."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asda_jax import attention as attn_lib
from asda_jax import hardware, sharding
from asda_jax import model as model_lib
from asda_jax.kernels import short_attention as short_kernel

RNG = np.random.default_rng(0)


# --------------------------------------------------------------------- NumPy oracles


def np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_softmax_map(q, k, mask=None):  # (B,T,H,D) -> (B,H,T,T), float64
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    if mask is not None:
        logits = np.where(mask[:, None, None, :], logits, -np.inf)
    return np_softmax(logits)


def np_differential_core(q1, k1, q2, k2, v, lam, mask=None):
    lam = np.broadcast_to(lam, (q1.shape[2],))[None, :, None, None]
    a = np_softmax_map(q1, k1, mask) - lam * np_softmax_map(q2, k2, mask)
    return np.einsum("bhqk,bkhd->bqhd", a, v)


def np_layer_norm(x, gamma, beta, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * gamma + beta


def np_release_attention(x, w, heads, mask=None):
    """The release's AltAttention from its formula; weights in torch (out, in) layout."""
    b, t, d = x.shape
    qk = x @ w["qk_w"].T + w["qk_b"]
    q1, q2, k1, k2 = (
        qk[..., i * d : (i + 1) * d].reshape(b, t, heads, d // heads) for i in range(4)
    )
    v = (x @ w["v_w"].T + w["v_b"]).reshape(b, t, heads, d // heads)
    o = np_differential_core(q1, k1, q2, k2, v, 0.1, mask).reshape(b, t, d)
    o = np_layer_norm(o, w["norm_w"], w["norm_b"], 1e-5) * 0.95
    return o @ w["proj_w"].T + w["proj_b"]


def np_diff_transformer_attention(x, w, num_heads, layer_index, mask=None):
    """multihead_diffattn (Ye et al.) from its equations; num_heads = differential heads."""
    b, t, d_model = x.shape
    d = d_model // num_heads // 2
    q = (x @ w["q_w"].T).reshape(b, t, 2 * num_heads, d)
    k = (x @ w["k_w"].T).reshape(b, t, 2 * num_heads, d)
    v = (x @ w["v_w"].T).reshape(b, t, num_heads, 2 * d)
    a = np_softmax_map(q, k, mask).reshape(b, num_heads, 2, t, t)  # sub-heads 2i, 2i+1 pair
    lam_init = 0.8 - 0.6 * math.exp(-0.3 * layer_index)
    lam = math.exp(np.sum(w["lq1"] * w["lk1"])) - math.exp(np.sum(w["lq2"] * w["lk2"])) + lam_init
    o = np.einsum("bhqk,bkhd->bqhd", a[:, :, 0] - lam * a[:, :, 1], v)  # (B, T, H, 2d)
    o = o / np.sqrt((o**2).mean(-1, keepdims=True) + 1e-5) * w["subln"]
    o = o * (1 - lam_init)
    return o.reshape(b, t, d_model) @ w["o_w"].T


def trailing_mask(lengths, total):
    return np.arange(total)[None, :] < np.asarray(lengths)[:, None]


def randn(*shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


# --------------------------------------------------------------------- both forms vs oracles


@pytest.mark.parametrize("lengths", [None, (9, 5)])
def test_release_form_matches_numpy_formula(lengths):
    d, heads, t = 32, 4, 9
    x = randn(2, t, d)
    w = {
        "qk_w": randn(4 * d, d, scale=0.3),
        "qk_b": randn(4 * d, scale=0.1),
        "v_w": randn(d, d, scale=0.3),
        "v_b": randn(d, scale=0.1),
        "norm_w": 1 + randn(d, scale=0.1),
        "norm_b": randn(d, scale=0.1),
        "proj_w": randn(d, d, scale=0.3),
        "proj_b": randn(d, scale=0.1),
    }
    dh = d // heads
    params = {
        "qk": {
            "kernel": w["qk_w"].T.reshape(d, 4, heads, dh),
            "bias": w["qk_b"].reshape(4, heads, dh),
        },
        "v": {"kernel": w["v_w"].T.reshape(d, heads, dh), "bias": w["v_b"].reshape(heads, dh)},
        "norm": {"scale": w["norm_w"].reshape(heads, dh), "bias": w["norm_b"].reshape(heads, dh)},
        "proj": {"kernel": w["proj_w"].T.reshape(heads, dh, d), "bias": w["proj_b"]},
    }
    mask = None if lengths is None else trailing_mask(lengths, t)
    cfg = model_lib.ModelConfig(embed_dim=d, num_heads=heads)
    ours = model_lib.AsdaAttention(cfg).apply(
        {"params": params}, x, None if mask is None else jnp.asarray(mask)
    )
    expected = np_release_attention(x.astype(np.float64), w, heads, mask)
    valid = np.ones((2, t), bool) if mask is None else mask
    np.testing.assert_allclose(np.asarray(ours)[valid], expected[valid], atol=1e-5, rtol=0)


@pytest.mark.parametrize("layer_index", [0, 5])
@pytest.mark.parametrize("lengths", [None, (7, 4)])
def test_diff_transformer_form_matches_published_equations(layer_index, lengths):
    d_model, num_heads, t = 32, 4, 7  # 2 differential heads, q/k sub-heads 8 wide, v 16 wide
    h, d = num_heads // 2, d_model // num_heads
    x = randn(2, t, d_model)
    w = {n: randn(d_model, d_model, scale=0.3) for n in ("q_w", "k_w", "v_w", "o_w")}
    w.update({n: randn(d, scale=0.3) for n in ("lq1", "lk1", "lq2", "lk2")})
    w["subln"] = 1 + randn(2 * d, scale=0.1)
    params = {
        "q": {"kernel": w["q_w"].T.reshape(d_model, h, 2, d)},
        "k": {"kernel": w["k_w"].T.reshape(d_model, h, 2, d)},
        "v": {"kernel": w["v_w"].T.reshape(d_model, h, 2 * d)},
        "out_proj": {"kernel": w["o_w"].T.reshape(h, 2 * d, d_model)},
        "lambda_q1": w["lq1"],
        "lambda_k1": w["lk1"],
        "lambda_q2": w["lq2"],
        "lambda_k2": w["lk2"],
        "subln": {"scale": w["subln"]},
    }
    mask = None if lengths is None else trailing_mask(lengths, t)
    cfg = model_lib.ModelConfig(embed_dim=d_model, num_heads=num_heads, attention="diff")
    module = model_lib.DiffTransformerAttention(cfg, layer_index)
    ours = module.apply({"params": params}, x, None if mask is None else jnp.asarray(mask))
    expected = np_diff_transformer_attention(x.astype(np.float64), w, h, layer_index, mask)
    valid = np.ones((2, t), bool) if mask is None else mask
    np.testing.assert_allclose(np.asarray(ours)[valid], expected[valid], atol=1e-5, rtol=0)


def test_lambda_init_per_layer_is_the_published_schedule():
    published = [0.2000, 0.3555, 0.4707, 0.5561, 0.6193, 0.6661]
    published += [0.7008, 0.7265, 0.7456, 0.7597, 0.7701, 0.7779]
    ours = [model_lib.lambda_init(layer) for layer in range(12)]
    np.testing.assert_allclose(ours, published, atol=5e-5)


def test_core_matches_numpy_with_per_head_lambda_and_mask():
    b, t, h, dk, dv = 2, 11, 3, 8, 16
    q1, k1, q2, k2 = (randn(b, t, h, dk) for _ in range(4))
    v = randn(b, t, h, dv)
    lam = np.array([0.1, 0.5, -0.2], np.float32)
    mask = trailing_mask((11, 6), t)
    out = attn_lib.differential_attention(q1, k1, q2, k2, v, lam, mask=jnp.asarray(mask))
    expected = np_differential_core(*(a.astype(np.float64) for a in (q1, k1, q2, k2, v)), lam, mask)
    np.testing.assert_allclose(np.asarray(out)[mask], expected[mask], atol=1e-5, rtol=0)


def _autodiff_formula(q1, k1, q2, k2, v, lam, mask):
    """The core written directly in jnp, differentiated by JAX's autodiff."""

    def softmax_map(q, k):
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
        return jax.nn.softmax(jnp.where(mask[:, None, None, :], logits, -1e30), axis=-1)

    a = softmax_map(q1, k1) - lam[None, :, None, None] * softmax_map(q2, k2)
    return jnp.einsum("bhqk,bkhd->bqhd", a, v)


def test_reference_backward_equals_autodiff_for_every_input():
    b, t, h, dk, dv = 2, 13, 3, 8, 16
    args = [jnp.asarray(randn(b, t, h, dk)) for _ in range(4)] + [jnp.asarray(randn(b, t, h, dv))]
    args += [jnp.array([0.1, 0.4, -0.3])]
    mask = jnp.asarray(trailing_mask((13, 8), t))
    weights = jax.random.normal(jax.random.key(2), (b, t, h, dv)) * mask[:, :, None, None]

    def ours(q1, k1, q2, k2, v, lam):
        out = attn_lib.differential_attention(q1, k1, q2, k2, v, lam, mask=mask)
        return jnp.sum(out * weights)

    def direct(*a):
        return jnp.sum(_autodiff_formula(*a, mask) * weights)

    expected = jax.grad(direct, argnums=range(6))(*args)
    got = jax.grad(ours, argnums=range(6))(*args)
    for name, g, e in zip(["q1", "k1", "q2", "k2", "v", "lam"], got, expected, strict=True):
        np.testing.assert_allclose(g, e, atol=1e-5, rtol=1e-5, err_msg=name)


def test_returned_maps_are_row_stochastic_and_ignore_padding():
    b, t, h, d = 2, 10, 2, 8
    q1, k1, q2, k2, v = (randn(b, t, h, d) for _ in range(5))
    mask = trailing_mask((10, 4), t)
    _, (a1, a2) = attn_lib.differential_attention(
        q1, k1, q2, k2, v, 0.1, mask=jnp.asarray(mask), return_maps=True
    )
    for a in (np.asarray(a1), np.asarray(a2)):
        assert a.shape == (b, h, t, t)
        np.testing.assert_allclose(a.sum(-1), 1.0, atol=1e-6)
        assert np.all(a[1, :, :, 4:] == 0.0)  # padded keys get no weight


# --------------------------------------------------------------------- backends vs reference


def _inputs(dk=16, dv=16, t=40, h=2, b=2, seed=0):
    """q1, k1, q2, k2, v and a key mask, drawn from their own seed: a test's inputs do
    not depend on which tests ran before it."""
    rng = np.random.default_rng(seed)
    shapes = [(b, t, h, dk)] * 4 + [(b, t, h, dv)]
    arrays = [jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in shapes]
    return arrays, jnp.asarray(trailing_mask((t, t - 13), t))


def _forward_and_grads(implementation, arrays, mask):
    weights = jax.random.normal(jax.random.key(1), arrays[4].shape)  # the same for every call
    valid_rows = mask[:, :, None, None]

    def loss(q1, k1, q2, k2, v, lam):
        out = attn_lib.differential_attention(
            q1, k1, q2, k2, v, lam, mask=mask, implementation=implementation, interpret=True
        )
        return jnp.sum(jnp.where(valid_rows, out * weights, 0.0)), out

    (_, out), grads = jax.value_and_grad(loss, argnums=range(6), has_aux=True)(
        *arrays, jnp.float32(0.3)
    )
    return jnp.where(valid_rows, out, 0.0), grads


@pytest.mark.parametrize("implementation", ["xla", "pallas_splash", "pallas_short"])
def test_backend_matches_reference_forward_and_gradients(implementation):
    arrays, mask = _inputs()
    ref_out, ref_grads = _forward_and_grads("reference", arrays, mask)
    out, grads = _forward_and_grads(implementation, arrays, mask)
    np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=0)
    for g, ref in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("implementation", ["xla", "pallas_short"])
def test_hand_written_backward_in_bfloat16_is_as_accurate_as_autodiff(implementation):
    """At bfloat16 a hand-written backward stays as close to the float32 reference's
    gradients as autodiff of the reference does."""
    arrays, mask = _inputs()
    _, exact = _forward_and_grads("reference", arrays, mask)
    half = [a.astype(jnp.bfloat16) for a in arrays]
    _, ours = _forward_and_grads(implementation, half, mask)
    _, autodiff = _forward_and_grads("reference", half, mask)

    def error(grads):  # the worst gradient's error, relative to its scale
        return max(
            float(jnp.max(jnp.abs(g.astype(jnp.float32) - e)) / jnp.max(jnp.abs(e)))
            for g, e in zip(grads, exact, strict=True)
        )

    assert error(ours) < 2e-2
    assert error(ours) <= 1.5 * error(autodiff)


@pytest.mark.parametrize("implementation", ["xla", "pallas_splash"])
def test_backend_with_wider_values_matches_reference(implementation):
    arrays, mask = _inputs(dk=8, dv=16, t=24)  # DIFF form: v heads twice as wide as q/k
    ref_out, ref_grads = _forward_and_grads("reference", arrays, mask)
    out, grads = _forward_and_grads(implementation, arrays, mask)
    np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=0)
    for g, ref in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("dk", "dv", "t", "lengths"),
    [(8, 16, 24, (24, 11)), (16, 16, 128, (128, 128)), (16, 16, 103, (103, 103))],
)
def test_short_kernel_on_both_forms_and_at_its_full_block(dk, dv, t, lengths):
    """The DIFF form's values twice as wide as q/k, a sequence filling the 128-token
    block (no padding), and the student's 103 tokens."""
    arrays = [jnp.asarray(randn(2, t, 2, dk)) for _ in range(4)] + [jnp.asarray(randn(2, t, 2, dv))]
    mask = jnp.asarray(trailing_mask(lengths, t))
    ref_out, ref_grads = _forward_and_grads("reference", arrays, mask)
    out, grads = _forward_and_grads("pallas_short", arrays, mask)
    np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=0)
    for g, ref in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, ref, atol=2e-5, rtol=0)


def test_short_kernel_under_a_mesh_equals_the_reference():
    """Shard_mapped over an 8-device mesh's batch axis, λ's gradient summed over it."""
    arrays, _ = _inputs(b=8, t=20)
    mask = jnp.asarray(trailing_mask((20, 7) * 4, 20))
    ref_out, ref_grads = _forward_and_grads("reference", arrays, mask)
    with sharding.activate(sharding.make_mesh(sharding.DATA_PARALLEL)):
        out, grads = jax.jit(
            lambda *a: _forward_and_grads("pallas_short", list(a), mask)
        )(*arrays)  # fmt: skip
    np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=0)
    for g, ref in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, ref, atol=1e-5, rtol=0)


def test_the_release_attention_hands_its_fused_projection_to_the_short_kernel_whole():
    """AsdaAttention gives the short kernel its (B, T, 4, H, D) projection undivided:
    the layer's output and every gradient equal the reference backend's."""
    cfg = model_lib.preset("tiny")  # 4 heads of 16
    x = jnp.asarray(randn(2, 26, cfg.embed_dim))
    mask = jnp.asarray(trailing_mask((26, 9), 26))

    def layer(implementation):
        run = model_lib.Execution(attention_impl=implementation, interpret_kernels=True)
        return model_lib.AsdaAttention(cfg, run)

    params = layer("reference").init(jax.random.key(0), x, mask)["params"]

    def loss(implementation, p, x):
        return jnp.sum(jnp.square(layer(implementation).apply({"params": p}, x, mask)))

    with attn_lib.recorded_choices() as choices:
        ours = jax.value_and_grad(functools.partial(loss, "pallas_short"), (0, 1))(params, x)
    assert choices == [(26, "pallas_short")]
    ref = jax.value_and_grad(functools.partial(loss, "reference"), (0, 1))(params, x)
    for got, want in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_plain_attention_backends_agree():
    (q, k, _, _, v), mask = _inputs()
    ref = attn_lib.dot_product_attention(q, k, v, mask=mask, implementation="reference")
    for implementation in ("xla", "pallas_splash"):
        out = attn_lib.dot_product_attention(
            q, k, v, mask=mask, implementation=implementation, interpret=True
        )
        np.testing.assert_allclose(
            np.asarray(out)[np.asarray(mask)], np.asarray(ref)[np.asarray(mask)], atol=1e-5
        )


# --------------------------------------------------------------------- the chooser

CPU, H100, A100, V5E = (hardware.chip(n) for n in ("cpu", "h100", "a100", "v5e"))


def _choose(implementation, **kw):
    args = dict(chip=CPU, dtype=jnp.float32, head_dim=64, length=513, need_maps=False)
    return attn_lib.choose_backend(implementation, **{**args, **kw})


def test_auto_takes_the_rule_of_the_chip():
    assert _choose("auto") == "xla"
    assert _choose("auto", chip=H100, dtype=jnp.bfloat16) == "cudnn"
    assert _choose("auto", chip=H100, dtype=jnp.float32) == "xla"  # cuDNN: half precision
    assert _choose("auto", chip=H100, dtype=jnp.bfloat16, head_dim=256) == "cudnn"
    assert _choose("auto", chip=A100, dtype=jnp.bfloat16, head_dim=256) == "xla"  # ≤ 128 there
    assert _choose("auto", chip=hardware.chip("gpu"), dtype=jnp.bfloat16) == "cudnn"
    assert _choose("auto", chip=V5E) == "pallas_splash"
    assert _choose("auto", chip=V5E, length=103) == "pallas_short"  # student tokens
    assert _choose("auto", chip=V5E, length=103, branches=1) == "xla"  # plain attention
    assert _choose("auto", chip=V5E, need_maps=True) == "reference"


def test_an_explicit_backend_that_cannot_run_is_refused_with_the_reason():
    refused = [
        (dict(implementation="cudnn"), "cuDNN needs a GPU, this is cpu"),
        (dict(implementation="cudnn", chip=H100), "needs bf16/fp16 and a head dim <= 256"),
        (dict(implementation="pallas_splash"), "Pallas TPU kernels need a TPU"),
        (dict(implementation="pallas_short", chip=V5E), "at most 128 tokens"),
        (dict(implementation="pallas_short", chip=V5E, length=20, branches=1), "1 branches"),
    ]
    for call, reason in refused:
        with pytest.raises(ValueError, match=reason):
            _choose(**call)
    # what can run is taken as asked
    assert _choose("pallas_splash", interpret=True) == "pallas_splash"
    assert _choose("reference", chip=V5E) == "reference"
    assert _choose("cudnn", chip=H100, dtype=jnp.bfloat16) == "cudnn"
    arrays, mask = _inputs(t=12)
    with pytest.raises(ValueError, match="cuDNN needs a GPU"):
        attn_lib.differential_attention(*arrays, 0.1, mask=mask, implementation="cudnn")


def test_the_chooser_follows_the_chip_it_is_given_not_the_host():
    """In one CPU process, the same call picks each chip's kernels by its argument."""
    picks = {c.name: _choose("auto", chip=c, dtype=jnp.bfloat16) for c in (CPU, H100, V5E)}
    assert picks == {"cpu": "xla", "h100": "cudnn", "v5e": "pallas_splash"}
    cfg = model_lib.preset("tiny", embed_dim=256, num_heads=2)  # 128-wide heads
    tokens = jnp.ones((1, 130, 256))  # at least one lane-width of tokens
    for chip, backend in (("cpu", "xla"), ("v5e", "pallas_splash")):
        run = model_lib.Execution(chip=chip, dtype="float32", interpret_kernels=True)
        seen = []
        real = attn_lib._fused_attention

        def spy(name, *args, real=real, seen=seen, **kwargs):
            seen.append(name)
            return real(name, *args, **kwargs)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(attn_lib, "_fused_attention", spy)
            module = model_lib.AsdaAttention(cfg, run)
            module.init(jax.random.key(0), tokens, None)
        assert seen == ([] if backend == "xla" else [backend, backend]), chip


def test_unknown_backend_is_an_error():
    with pytest.raises(ValueError, match="unknown attention implementation"):
        _choose("flash3")


def pallas_costs(fn, *args) -> list:
    """The cost estimates of the Pallas calls in ``fn``'s program (nested jaxprs too)."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                found.append(eqn.params["cost_estimate"])
            for sub in jax.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def test_the_short_kernel_declares_its_flops_exponentials_and_bytes():
    """The compiler counts nothing inside a Pallas call unless it is told: 3 map-sized
    products going forward (each branch's QKᵀ, the mixed map times V, as flop_counts
    counts them), 8 coming back (both QKᵀ recomputed, dV, dL/dmap, each branch's dQ and
    dK), two maps' exponentials each way."""
    b, t, h, d = 2, 24, 3, 16
    qk = jax.random.normal(jax.random.PRNGKey(0), (b, t, 4, h, d), jnp.bfloat16)
    v = jax.random.normal(jax.random.PRNGKey(1), (b, t, h, d), jnp.bfloat16)
    attend = functools.partial(short_kernel.fused_projection_attention, interpret=True)
    lam = jnp.full((h,), 0.5)
    loss = lambda qk, v: attend(qk, v, lam).astype(jnp.float32).sum()
    forward, backward = pallas_costs(jax.grad(loss, argnums=(0, 1)), qk, v)
    product = 2 * t * t * d  # one (T, T)-sized product at width d
    assert forward.flops == b * h * 3 * product and backward.flops == b * h * 8 * product
    assert forward.transcendentals == backward.transcendentals == b * h * 2 * t * t
    # q, k, v and the output once going forward; those, dO and the gradients back
    assert forward.bytes_accessed == (qk.nbytes + v.nbytes + v.nbytes + b * t * 4)
    assert backward.bytes_accessed == (2 * qk.nbytes + 3 * v.nbytes + b * t * 4 + b * h * 4096)
