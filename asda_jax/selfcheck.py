"""A run's kernels checked against their XLA forms on the devices in hand, before the
run spends them.

The Pallas kernels (short attention, splash attention, the MLP, the decoder block) and
cuDNN's fused attention are proven on CPU in interpret mode and by compiling; their
first run on a chip is the user's. ``check_run`` calls every kernel a run will use, at
the run's shapes (one device's examples of each encoder pass and of the decoder) and
compute dtype, on random inputs, next to the XLA form it replaces: forward outputs and
the gradients of every input (where the run takes them) must agree within
``BOUNDS``, the error measured against the XLA form's largest magnitude. Both forms are
also timed. ``with_fallbacks`` turns a kernel that disagrees off for the run (its XLA
form runs instead), and with ``selfcheck="fastest"`` also one slower than its XLA form.

``selfcheck`` in a run config: "auto" (on where a kernel runs compiled: TPUs and GPUs),
"on", "fastest" (on, and a slower kernel is dropped too), "off".
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from asda_jax import attention, config_lib, objectives, sharding
from asda_jax.kernels import mlp as mlp_kernel
from asda_jax.model import decoder as decoder_model
from asda_jax.model import encoder as encoder_model
from asda_jax.model.config import KERNEL_FORM

# The error model. A form's error is max |form − exact| over max |exact|, "exact" being
# the XLA form evaluated in float32 at full matmul precision on the same (rounded)
# inputs. A correct kernel rounds where the XLA form rounds, in another order, so its
# error is of the order of the XLA form's own: it may be MARGIN times that, plus a floor
# for an XLA form that happens to be exact (float32 on a CPU): ROUNDING_STEPS of the
# compute dtype's relative step (its machine epsilon: 2⁻⁷ bfloat16, 2⁻¹⁰ float16, 2⁻²³
# float32), and ACCUMULATION_STEPS of float32's, as float32 accumulators summing n terms
# in another (blocked) order drift by about √n steps: n up to a few thousand in a
# forward (the MLP's width), tens of thousands in a weight gradient (a device's tokens).
# The bound follows from the dtype alone, so every compute dtype has one. A wrong kernel
# (a sign, a missing block) is off by the order of the values themselves, far outside.
MARGIN = 4.0
ROUNDING_STEPS = {"forward": 2.0, "gradients": 8.0}
ACCUMULATION_STEPS = {"forward": 64.0, "gradients": 256.0}
REPORT_FILE = "selfcheck.json"
KERNELS = ("attention", "mlp", "decoder")  # what a run can turn off, each to its XLA form
TIMED_CALLS = 5


@dataclasses.dataclass(frozen=True)
class Call:
    """One kernel at one of the run's shapes: the kernel's form and the XLA form as
    functions of the same arrays, and which of those arrays the run differentiates."""

    kernel: str  # what ``with_fallbacks`` turns off: "mlp" | "decoder" | "attention"
    form: str  # the kernel's name ("pallas_short", "pallas" ...)
    where: str  # the pass and shape, for the report
    fn: Callable
    xla: Callable  # compute dtype -> the XLA form computing in it
    inputs: tuple
    backward: bool


@dataclasses.dataclass(frozen=True)
class Check:
    """What one call's comparison found."""

    kernel: str
    form: str
    where: str
    dtype: str
    forward_error: float | None  # the kernel's; None: the kernel raised
    gradient_error: float | None  # None: forward only in this run, or the kernel raised
    forward_bound: float
    gradient_bound: float
    kernel_ms: float | None  # None: the kernel raised
    xla_ms: float
    xla_forward_error: float = 0.0  # the XLA form's own, which the bounds are made from
    xla_gradient_error: float | None = None
    error: str | None = None  # what the kernel raised (lowering, memory, runtime)

    @property
    def agrees(self) -> bool:
        if self.error is not None:
            return False
        grads_ok = self.gradient_error is None or self.gradient_error <= self.gradient_bound
        return bool(self.forward_error <= self.forward_bound and grads_ok)

    @property
    def slower(self) -> bool:
        return self.kernel_ms is not None and self.kernel_ms > self.xla_ms


def wanted(run: config_lib.RunConfig) -> bool:
    """Whether ``run`` checks its kernels ("auto": where they run compiled)."""
    if run.selfcheck == "auto":
        return run.chip.platform in ("tpu", "gpu")
    return run.selfcheck != "off"


# ---------------------------------------------------------------------------- the calls


def encoder_passes(run: config_lib.RunConfig, devices: int) -> list[tuple[str, int, int, bool]]:
    """(name, examples per device, tokens, backward) of each encoder pass of a step on a
    ``devices``-way data-parallel mesh."""
    cfg, data = run.model, run.data
    per_device = max(1, data.batch_size // devices)
    grid = objectives.grid_shape(data.target_frames, cfg)
    patches = grid[0] * grid[1]
    if run.task == "pretrain":
        clones = per_device * run.mask.clone_batch
        student = ("student", clones, run.mask.num_kept(patches) + 1, True)
        return [student, ("teacher", per_device, patches + 1, False)]
    frozen = run.task == "linear_probe"
    return [("encoder", per_device, patches + 1, not frozen)]


def _normal(key, shape, dtype, scale=1.0):
    return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def mlp_calls(run, devices, keys) -> list[Call]:
    cfg, dtype = run.model, run.execution.compute_dtype
    calls = []
    for name, examples, tokens, backward in encoder_passes(run, devices):
        k = jax.random.split(next(keys), 5)
        d, f = cfg.embed_dim, cfg.mlp_dim
        inputs = (
            _normal(k[0], (examples, tokens, d), dtype),
            _normal(k[1], (d, f), jnp.float32, d**-0.5),
            _normal(k[2], (f,), jnp.float32, 0.1),
            _normal(k[3], (f, d), jnp.float32, f**-0.5),
            _normal(k[4], (d,), jnp.float32, 0.1),
        )
        kernel = lambda x, w1, b1, w2, b2: mlp_kernel.mlp(
            x, w1, b1, w2, b2, vmem_bytes=run.chip.kernel_vmem_bytes,
            cores=run.chip.cores_per_device, interpret=run.execution.interpret_kernels,
        )  # fmt: skip
        xla = lambda in_dtype: functools.partial(encoder_model.mlp, dtype=in_dtype)
        where = f"{name} {examples}×{tokens}×{d}"
        calls.append(Call("mlp", "pallas", where, kernel, xla, inputs, backward))
    return calls


def decoder_calls(run, devices, keys) -> list[Call]:
    cfg, dtype = run.model, run.execution.compute_dtype
    (_, examples, _, _), *_ = encoder_passes(run, devices)  # the student's clones
    height, width = objectives.grid_shape(run.data.target_frames, cfg)
    groups, k = cfg.decoder_groups, cfg.decoder_kernel
    calls = []
    # each block input width: the first block's (embed_dim) and the others' (decoder_dim)
    for cin in sorted({cfg.embed_dim, cfg.decoder_dim}):
        keys_ = jax.random.split(next(keys), 3)
        fan_in = cin // groups * k * k
        inputs = (
            _normal(keys_[0], (examples, cin, height, width), dtype),
            _normal(keys_[1], (k, k, cin // groups, cfg.decoder_dim), jnp.float32, fan_in**-0.5),
            _normal(keys_[2], (cfg.decoder_dim,), jnp.float32, 0.1),
        )
        kernel = lambda x, w, b: decoder_model.channels_major_block(
            x,
            w,
            b,
            groups=groups,
            chip=run.chip,
            interpret=run.execution.interpret_kernels,
            dtype=dtype,
        )

        def xla(in_dtype):  # the channels-last XLA block, its result channels-major
            def block(x, w, b):
                y = decoder_model.channels_last_block(
                    x.transpose(0, 2, 3, 1), w, b, groups=groups, form="xla", dtype=in_dtype
                )
                return y.transpose(0, 3, 1, 2)

            return block

        where = f"{examples}×{cin}×{height}×{width} → {cfg.decoder_dim}"
        calls.append(Call("decoder", "pallas", where, kernel, xla, inputs, True))
    return calls


def attention_calls(run, devices, keys) -> list[Call]:
    """The attention kernel each encoder pass takes on this chip (none where it takes
    the XLA form)."""
    cfg, dtype, ex = run.model, run.execution.compute_dtype, run.execution
    options = dict(chip=run.chip, interpret=ex.interpret_kernels)
    calls = []
    for name, examples, tokens, backward in encoder_passes(run, devices):
        k = jax.random.split(next(keys), 5)
        if cfg.attention == "plain":
            shapes = [(examples, tokens, cfg.num_heads, cfg.head_dim)] * 3
            attend, branches = attention.dot_product_attention, 1
        elif cfg.attention == "asda":
            heads = (cfg.num_heads, cfg.head_dim)
            shapes = [(examples, tokens, 4, *heads), (examples, tokens, *heads)]
            attend = _with_lambda(attention.fused_projection_attention, cfg.diff_lambda)
            branches = 2
        else:  # the DIFF Transformer's pairs of sub-heads, v twice as wide
            heads, d = cfg.num_heads // 2, cfg.head_dim
            shapes = [(examples, tokens, heads, d)] * 4 + [(examples, tokens, heads, 2 * d)]
            attend = _with_lambda(attention.differential_attention, 0.5)
            branches = 2
        backend = attention.choose_backend(
            ex.attention_impl, chip=run.chip, dtype=dtype, head_dim=shapes[-1][-1],
            length=tokens, interpret=ex.interpret_kernels, branches=branches,
        )  # fmt: skip
        if backend in ("xla", "reference"):
            continue
        inputs = tuple(_normal(key, s, dtype) for key, s in zip(k, shapes, strict=False))
        where = f"{name} {examples}×{tokens}, {shapes[-1][-2]} heads of {shapes[-1][-1]}"
        for mask in (None, padding_mask(examples, tokens)):
            kernel = _attending(attend, mask, implementation=backend, **options)
            xla = lambda _, attend=attend, mask=mask: _attending(
                attend, mask, implementation="xla", **options
            )  # the inputs' dtype is the one it computes in
            suffix = "" if mask is None else ", padding masked"
            calls.append(Call("attention", backend, where + suffix, kernel, xla, inputs, backward))
    return calls


def padding_mask(examples: int, tokens: int) -> jax.Array:  # (examples, tokens) bool
    """Trailing padding as the tools mask it (``encoder.token_mask``): the CLS token and
    at least one patch real, example i padded over about (i + 1)/(examples + 1) of its
    patches, so that every example has a different real length."""
    patches = tokens - 1
    padded = [patches * (i + 1) // (examples + 1) for i in range(examples)]
    real = jnp.array([1 + max(1, patches - p) for p in padded])
    return jnp.arange(tokens)[None, :] < real[:, None]


def _attending(attend, mask, **options):
    """``attend`` with ``mask``, its padded query rows multiplied by zero: their values
    are left to the backend (cuDNN does not write them) and pooling drops them, but they
    must be finite, as the next layer multiplies them by zero too (a NaN stays one)."""
    if mask is None:
        return lambda *arrays: attend(*arrays, **options)
    rows = mask[:, :, None, None]  # (B, T, 1, 1) against the output's (B, T, H, D)
    return lambda *arrays: attend(*arrays, mask=mask, **options) * rows


def _with_lambda(fn, lam: float):
    """``fn`` of the q/k/v arrays alone, λ put in its place after them."""
    return lambda *arrays, **options: fn(*arrays, lam, **options)


def run_calls(run: config_lib.RunConfig, devices: int, seed: int = 0) -> list[Call]:
    """Every kernel call ``run`` makes per device, at its shapes (none for XLA forms)."""
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 64))
    ex = run.execution
    calls = attention_calls(run, devices, keys)
    if ex.mlp == KERNEL_FORM:
        calls += mlp_calls(run, devices, keys)
    if run.task == "pretrain" and ex.decoder_conv == KERNEL_FORM:
        calls += decoder_calls(run, devices, keys)
    return calls


# ---------------------------------------------------------------------------- checking


def _outputs_and_grads(fn, inputs, backward: bool, cotangent_key, dtype):
    """fn(*inputs), and with ``backward`` the gradients of every input for a random
    cotangent of the output, drawn in ``dtype`` (the same values for every form)."""
    if not backward:
        return fn(*inputs), None
    out, vjp = jax.vjp(fn, *inputs)
    cotangent = _normal(cotangent_key, out.shape, dtype).astype(out.dtype)
    return out, vjp(cotangent)


def relative_error(got, want) -> float:
    """max |got − want| over max |want|, over every leaf (float32); infinite where
    ``got`` is not finite."""
    pairs = zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
    worst = 0.0
    for g, w in pairs:
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        if not np.all(np.isfinite(g)):
            return float("inf")
        scale = max(float(np.max(np.abs(w))), np.finfo(np.float32).tiny)
        worst = max(worst, float(np.max(np.abs(g - w))) / scale)
    return worst


def _median_ms(fn, inputs, calls: int) -> float:
    jax.block_until_ready(fn(*inputs))  # compiled and warm
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        jax.block_until_ready(fn(*inputs))
        times.append(time.perf_counter() - started)
    return 1e3 * float(np.median(times))


def bound(xla_error: float, dtype: str, part: str) -> float:
    """How far from the float32 evaluation a correct kernel may be, for ``part``
    ("forward" or "gradients"), by the error model above."""
    rounding = ROUNDING_STEPS[part] * float(jnp.finfo(dtype).eps)
    accumulation = ACCUMULATION_STEPS[part] * float(jnp.finfo(jnp.float32).eps)
    return MARGIN * xla_error + rounding + accumulation


def _in_float32(inputs: tuple) -> tuple:
    return tuple(jnp.asarray(a, jnp.float32) for a in inputs)


def check_call(call: Call, dtype: str, timed_calls: int = TIMED_CALLS) -> Check:
    """The kernel against its XLA form at one shape. A kernel that raises (a lowering
    it refuses, on-chip memory it cannot have, a fault when it runs) is a kernel that
    disagrees: the run takes the XLA form, and the error text is kept for the report.
    The XLA form raising is the run's own fault and is not caught."""
    key = jax.random.PRNGKey(1)
    run = lambda fn: jax.jit(lambda *a: _outputs_and_grads(fn, a, call.backward, key, dtype))
    kernel, reference = run(call.fn), run(call.xla(dtype))
    with jax.default_matmul_precision("highest"):
        exact, exact_grads = jax.block_until_ready(
            run(call.xla(jnp.float32))(*_in_float32(call.inputs))
        )
    want, want_grads = jax.block_until_ready(reference(*call.inputs))
    xla_forward = relative_error(want, exact)
    xla_gradient = None if want_grads is None else relative_error(want_grads, exact_grads)
    found = dict(
        kernel=call.kernel, form=call.form, where=call.where, dtype=dtype,
        forward_bound=bound(xla_forward, dtype, "forward"),
        gradient_bound=bound(xla_gradient or 0.0, dtype, "gradients"),
        xla_ms=_median_ms(reference, call.inputs, timed_calls),
        xla_forward_error=xla_forward, xla_gradient_error=xla_gradient,
    )  # fmt: skip
    try:
        out, grads = jax.block_until_ready(kernel(*call.inputs))
        kernel_ms = _median_ms(kernel, call.inputs, timed_calls)
    except Exception as e:  # whatever the kernel's compiler or runtime raises
        text = f"{type(e).__name__}: {e}"
        return Check(**found, forward_error=None, gradient_error=None, kernel_ms=None,
                     error=text[:2000])  # fmt: skip
    return Check(
        **found,
        forward_error=relative_error(out, exact),
        gradient_error=None if grads is None else relative_error(grads, exact_grads),
        kernel_ms=kernel_ms,
    )


def check_run(
    run: config_lib.RunConfig, mesh: jax.sharding.Mesh, timed_calls: int = TIMED_CALLS
) -> list[Check]:
    """Every kernel ``run`` will use, checked at one device's shapes on the default
    device (the kernels run per device; called outside ``sharding.activate``), each
    form's time the median of ``timed_calls``."""
    dtype = jnp.dtype(run.execution.compute_dtype).name
    # a multi-slice mesh's data axes already span every slice
    calls = run_calls(run, sharding.data_parallel_size(mesh))
    return [check_call(c, dtype, timed_calls) for c in calls]


# ---------------------------------------------------------------------------- acting


def dropped(run: config_lib.RunConfig, checks: list[Check]) -> list[str]:
    """The kernels the run turns off: those that disagree, and with "fastest" those slower
    than their XLA form."""
    fastest = run.selfcheck == "fastest"
    off = {c.kernel for c in checks if not c.agrees or (fastest and c.slower)}
    return sorted(off)


def with_fallbacks(run: config_lib.RunConfig, kernels_off: list[str]) -> config_lib.RunConfig:
    """``run`` with each kernel of ``kernels_off`` replaced by its XLA form."""
    forms = {"mlp": {"mlp_impl": "xla"}, "decoder": {"decoder_conv_impl": "xla"}}
    forms["attention"] = {"attention_impl": "xla"}
    changes = {k: v for kernel in kernels_off for k, v in forms[kernel].items()}
    if not changes:
        return run
    execution = dataclasses.replace(run.execution, **changes).validate()
    return dataclasses.replace(run, execution=execution)


def report(checks: list[Check], kernels_off: list[str], device: str) -> dict:
    """The self-check as JSON: each call's errors, bounds and times, and what was dropped."""
    rows = [dataclasses.asdict(c) | {"agrees": c.agrees, "slower": c.slower} for c in checks]
    return {"device": device, "checks": rows, "dropped": kernels_off}


def scalars(checks: list[Check], kernels_off: list[str]) -> dict[str, float]:
    """The self-check in a run's metrics: 1 per kernel that agreed, 0 otherwise, and the
    number dropped."""
    kernels = sorted({c.kernel for c in checks})
    agreed = {k: all(c.agrees for c in checks if c.kernel == k) for k in kernels}
    return {f"selfcheck/{k}_agrees": float(v) for k, v in agreed.items()} | {
        "selfcheck/dropped": float(len(kernels_off))
    }


def table(checks: list[Check]) -> str:
    """The checks as a text table, one row per call: each error against the float32
    evaluation, the XLA form's own beside it."""
    head = ("kernel", "form", "where", "fwd err (XLA's)", "grad err (XLA's)", "kernel ms",
            "XLA ms", "verdict")  # fmt: skip
    rows = [head]
    for c in checks:
        forward = "-" if c.forward_error is None else f"{c.forward_error:.1e}"
        forward += f" ({c.xla_forward_error:.1e})"
        grad = "-" if c.gradient_error is None else f"{c.gradient_error:.1e}"
        if c.xla_gradient_error is not None:
            grad += f" ({c.xla_gradient_error:.1e})"
        kernel_ms = "-" if c.kernel_ms is None else f"{c.kernel_ms:.2f}"
        verdict = ("agrees" if c.agrees else "DISAGREES") + (", slower" if c.slower else "")
        if c.error is not None:
            verdict = f"RAISED {c.error.splitlines()[0][:120]}"
        rows.append((c.kernel, c.form, c.where, forward, grad, kernel_ms, f"{c.xla_ms:.2f}",
                     verdict))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows)


def write_report(workdir, payload: dict) -> None:
    (workdir / REPORT_FILE).write_text(json.dumps(payload, indent=2))
