"""Ahead-of-time compilation for accelerators this host lacks (asda_jax/aot.py).

The TPU tests compile with the real TPU compiler (libtpu, from the test extras) for
abstract v5e chips; without libtpu they are skipped with the reason. The GPU test
needs the CUDA plugin (jax[cuda12], not in the test extras: ~4 GB) and is skipped
with the reason where it is absent.
"""

import functools
import importlib.util
import json
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.cudnn import fused_attention_stablehlo as cudnn_checks

from asda_jax import aot, attention, config_lib, hardware, hlo, sharding, train_lib
from asda_jax.kernels import decoder as decoder_kernel
from tests.train_helpers import ROOT

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install libtpu==0.0.42.1): no TPU compiler here",
)
needs_cuda_plugin = pytest.mark.skipif(
    importlib.util.find_spec("jax_cuda12_plugin") is None,
    reason='the CUDA plugin is not installed (pip install "jax[cuda12]==0.10.2")',
)


def tiny_run(path: str, arg: str = "", frames: int = 256, clips: int = 4):
    """A tiny config of ``path`` whose teacher (frames/16·8 + 1 tokens) reaches the
    Pallas kernels' 128 tokens at 256 frames while the student (26 tokens) does not."""
    config = config_lib.load_file(path, ",".join(filter(None, ["model=tiny,mesh=v5e-8", arg])))
    config.data.update(target_frames=frames, batch_size=clips)
    if config.task == "pretrain":
        config.pretrain.average_top_k_layers = 2
        config.mask.clone_batch = 2
    return config


@pytest.fixture(scope="module")
def v5e_2x2():
    return aot.abstract_devices("v5e:2x2")


def program_of(step: aot.Step) -> hlo.HloSummary:
    return hlo.summary(step.compiled.as_text(), list(step.mesh.devices.flat))


@pytest.mark.compile
@needs_libtpu
def test_the_pretraining_step_compiles_for_v5e_with_the_pallas_kernels(v5e_2x2):
    step = aot.compile_step(tiny_run("configs/pretrain_as2m.py"), v5e_2x2)
    rep, text = aot.report(step), step.compiled.as_text()
    assert rep.chip == hardware.chip("v5e")
    # the teacher's 129 tokens through splash attention, the student's 26 (below splash's
    # 128) through the short kernel
    assert step.attention_choices == ((26, "pallas_short"), (129, "pallas_splash"))
    # the kernels: splash in the (forward-only) teacher; the short attention, the MLP and
    # the decoder block both ways
    assert hlo.pallas_kernels(text) == {
        ("splash", "forward"), ("attention", "forward"), ("attention", "backward"),
        ("mlp", "forward"), ("mlp", "backward"), ("decoder", "forward"), ("decoder", "backward"),
    }  # fmt: skip
    assert rep.devices == rep.chips == 4 and rep.fits
    assert rep.memory.total > rep.memory.arguments > 0
    # the compiler counts at least the model's matmuls (and elementwise work on top)
    assert rep.analytic_flops <= rep.compiler_flops < 3 * rep.analytic_flops
    assert rep.bytes_accessed > 0 and 0 < rep.mfu <= 1
    # data parallelism: no collective but all-reduces over all four chips
    collectives = program_of(step).collectives
    assert {(c["kind"], c["group_size"]) for c in collectives} == {("all-reduce", 4)}


@pytest.mark.compile
@needs_libtpu
def test_the_finetuning_step_compiles_for_v5e_forward_and_backward_kernels(v5e_2x2):
    config = tiny_run("configs/finetune_as20k.py")
    step = aot.compile_step(config, v5e_2x2)
    assert step.attention_choices == ((129, "pallas_splash"),)
    kernels = hlo.pallas_kernels(step.compiled.as_text())
    assert {("splash", "forward"), ("splash", "backward")} <= kernels
    assert {("mlp", "forward"), ("mlp", "backward")} <= kernels
    assert not {k for k, _ in kernels} & {"decoder", "attention"}  # no decoder, no short kernel
    assert step.task.num_classes == 527  # AudioSet's, known without the prepared data


@needs_libtpu
def test_kernels_and_front_end_follow_the_mesh_devices_not_the_host(v5e_2x2):
    config = tiny_run("configs/pretrain_as2m.py")
    on_tpu = aot.lower_step(config, v5e_2x2)
    config.mesh = dict(sharding.DATA_PARALLEL)
    on_cpu = aot.lower_step(config, jax.devices("cpu")[:4])
    assert jax.default_backend() == "cpu"  # the same process, the same call
    assert on_tpu.attention_choices == ((26, "pallas_short"), (129, "pallas_splash"))
    assert on_cpu.attention_choices == ((26, "xla"), (129, "xla"))
    assert on_tpu.task.forms == hardware.chip("v5e").forms == hardware.TPU_FORMS
    assert on_cpu.task.forms == hardware.CPU_FORMS
    assert on_tpu.task.run.decoder_conv == "pallas" and on_cpu.task.run.decoder_conv == "taps"
    assert on_tpu.task.data_cfg.fbank_on == "device" and on_cpu.task.data_cfg.fbank_on == "host"
    tpu_text = on_tpu.lowered.as_text()
    assert "tpu_custom_call" in tpu_text and "tpu_custom_call" not in on_cpu.lowered.as_text()


@pytest.mark.compile
@needs_libtpu
def test_multi_slice_only_the_gradient_reduction_crosses_slices():
    devices = aot.abstract_devices("v5e:2x2", num_slices=2)
    assert sorted({d.slice_index for d in devices}) == [0, 1]
    config = tiny_run("configs/pretrain_as2m.py", clips=8)
    config.mesh_dcn = {"data": 2}
    collectives = program_of(aot.compile_step(config, devices)).collectives
    crossing = [c for c in collectives if c["crosses_slices"]]
    # over the data-centre network: the multi-slice runtime's all-reduces (sums), only
    assert [c["kind"] for c in crossing] == ["dcn-all-reduce"]
    # no more than the float32 gradients (and the metrics), reduced within slices first
    grads = sum(x.size * 4 for x in jax.tree.leaves(rep_params(config)))
    assert grads / 8 < crossing[0]["bytes"] <= grads
    inside = [c for c in collectives if not c["crosses_slices"]]
    assert {c["kind"] for c in inside} >= {"reduce-scatter", "all-gather"}
    assert all(c["crosses_slices"] is False for c in inside if c["group_size"])
    assert {c["group_size"] for c in inside if c["group_size"]} == {4}


def rep_params(config):
    """The student's parameters of ``config`` (shapes only)."""
    task = train_lib.make_task(config_lib.read(config, hardware.chip("v5e")))
    return jax.eval_shape(task.init_params, jax.random.PRNGKey(0))


PRESET_CONFIGS = [
    ("configs/pretrain_as2m.py", ""),
    ("configs/finetune_as2m.py", ""),
    ("configs/finetune_as20k.py", ""),
    ("configs/finetune_esc50.py", ""),
    ("configs/finetune_spcv2.py", ""),
]
TPU_PRESETS = [name for name, p in hardware.MESH_PRESETS.items() if p.topology]


@pytest.mark.parametrize("preset", TPU_PRESETS)
@pytest.mark.parametrize("path,arg", PRESET_CONFIGS)
def test_every_preset_batch_splits_into_whole_clips_over_its_chips(preset, path, arg):
    config = config_lib.load_file(path, ",".join(filter(None, [f"mesh={preset}", arg])))
    spec = hardware.MESH_PRESETS[preset]
    assert config.data.batch_size % spec.devices == 0
    assert config.data.batch_size % spec.processes == 0
    config_lib.validate(
        config,
        chip=hardware.of_topology(spec.topology),
        device_count=spec.devices,
        process_count=spec.processes,
        require_files=False,
    )


def test_only_a_preset_whose_chips_cannot_hold_a_task_rematerialises_it():
    """One v5e chip (16 GiB) holds base pretraining's 48 clips only with every block
    rematerialised (BENCHMARKS.md: about 30 GB without, 11.8 GB with); its fine-tunings
    fit as they are, and no other preset changes the recipe's execution."""
    tasks = {"pretrain": "configs/pretrain_as2m.py", "as2m": "configs/finetune_as2m.py"}
    tasks["as20k"] = "configs/finetune_as20k.py"
    for preset in hardware.MESH_PRESETS:
        for task, path in tasks.items():
            policy = config_lib.load_file(path, f"mesh={preset}").execution.remat_policy
            want = "full" if (preset, task) == ("v5e-1", "pretrain") else "none"
            assert policy == want, (preset, task)
    # a flag still overrides the preset's rule
    config = config_lib.load_file("configs/pretrain_as2m.py", "mesh=v5e-1")
    config.execution.remat_policy = "dots"
    run = config_lib.read(config, hardware.chip("v5e"))
    assert run.execution.remat_policy == "dots"


@needs_libtpu
def test_every_tpu_preset_has_its_devices_and_hosts_and_resolves_to_its_chip_row():
    """As a TPU VM's JAX shows them: a v4's two TensorCores are one device, a TPU7x's
    two are two; a single chip and an 8-chip v5e/v6e VM are one host."""
    for preset in TPU_PRESETS:
        spec = hardware.MESH_PRESETS[preset]
        slices = math.prod(spec.dcn.values()) if spec.dcn else 1
        devices = aot.abstract_devices(spec.topology, slices)
        assert len(devices) == spec.devices, preset
        assert len({d.process_index for d in devices}) == spec.processes, preset
        row = hardware.of_devices(devices)  # by the device kind libtpu reports
        assert row is hardware.of_topology(spec.topology) and row.device_kinds, preset
        assert row.peak_flops and row.hbm_bytes and row.kernel_vmem_bytes, preset
    kinds = {hardware.of_topology(hardware.MESH_PRESETS[p].topology).name for p in TPU_PRESETS}
    assert {"v4", "v5e", "v5p", "v6e", "tpu7x"} <= kinds


def test_every_gpu_row_describes_its_chip_to_the_cuda_compiler():
    gpus = [c for c in hardware.CHIPS.values() if c.platform == "gpu" and c.device_kinds]
    assert {c.name for c in gpus} == {"a100", "h100", "h200", "b200"}
    for row in gpus:
        assert hardware.of_kind(row.description, "gpu") is row  # as JAX names the device
        assert row.peak_flops and row.hbm_bandwidth and row.gpu_target is not None
        text = aot.gpu_target_config(row)
        major, minor = row.gpu_target.compute_capability
        assert f"cuda_compute_capability {{ major: {major} minor: {minor} }}" in text
        assert f'device_description_str: "{row.description}"' in text
    assert hardware.of_kind("NVIDIA RTX 9000", "gpu") is hardware.chip("gpu")  # unknown: generic
    # every GPU preset compiles for a described chip
    gpu_presets = [p for p in hardware.MESH_PRESETS.values() if p.platform == "gpu"]
    assert all(hardware.of_topology(p.compile_topology).gpu_target for p in gpu_presets)


@pytest.mark.compile
@needs_libtpu
def test_on_megacore_chips_the_kernels_backward_grids_carry_a_parallel_axis():
    """Mosaic splits only "parallel" grid axes over a megacore chip's two TensorCores:
    compiled for v5p, the MLP and decoder kernels' backward grids lead with one (each
    core its own examples and weight-gradient accumulators) beside their sequential
    accumulating axes; the forward grids are parallel throughout."""
    assert hardware.chip("v5p").cores_per_device == 2 == hardware.chip("v4").cores_per_device
    step = aot.compile_step(tiny_run("configs/pretrain_as2m.py"), aot.abstract_devices("v5p:2x2x1"))
    semantics = hlo.pallas_grid_semantics(step.compiled.as_text())
    for kernel in ("mlp", "decoder"):
        assert semantics[(kernel, "backward")] == {"parallel", "arbitrary"}, kernel
        assert semantics[(kernel, "forward")] == {"parallel"}, kernel
    assert semantics[("attention", "backward")] == {"parallel"}  # per (example, head) already


SPLASH_TEACHER = ((26, "pallas_short"), (129, "pallas_splash"))  # at 256 frames
DEMO_GRID = ((13, "pallas_short"), (65, "pallas_short"))  # at 128 frames: 8 × 8 patches


@pytest.mark.compile
@needs_libtpu
@pytest.mark.parametrize(
    "topology,clips,frames,choices",
    [
        ("v6e:2x2", 4, 256, SPLASH_TEACHER),
        ("tpu7x:2x2x1", 8, 256, SPLASH_TEACHER),
        ("v6e:1x1", 1, 128, DEMO_GRID),
    ],
)
def test_the_new_chips_compile_the_pretraining_step_with_the_kernels(
    topology, clips, frames, choices
):
    """Trillium, Ironwood (two devices per chip) and a single chip (Colab's) at the demo's
    grid, whose 64 positions are half a lane-width: the decoder kernel takes it whole."""
    devices = aot.abstract_devices(topology)
    config = tiny_run("configs/pretrain_as2m.py", clips=clips, frames=frames)
    step = aot.compile_step(config, devices)
    rep = aot.report(step)
    assert rep.chip is hardware.of_topology(topology) and rep.fits
    assert rep.devices == len(devices) == rep.chips * rep.chip.devices_per_chip
    assert step.attention_choices == choices
    kernels = {k for k, _ in hlo.pallas_kernels(step.compiled.as_text())}
    splash = {"splash"} if choices == SPLASH_TEACHER else set()
    assert kernels == {"attention", "mlp", "decoder"} | splash
    assert rep.analytic_flops <= rep.compiler_flops and 0 < rep.mfu <= 1
    # data parallelism: each device masks, picks and places its own clips' patches
    # (objectives.student_forward), so no device gathers another's kept patches
    assert {c["kind"] for c in program_of(step).collectives} <= {"all-reduce"}


def test_a_batch_that_does_not_split_over_the_devices_is_refused():
    config = config_lib.load_file("configs/pretrain_as2m.py", "mesh=v5e-32")
    config.data.batch_size = 48  # the recipe's, over 32 chips: 1.5 clips each
    with pytest.raises(config_lib.ConfigError, match="multiple of 32"):
        config_lib.validate(
            config, chip=hardware.chip("v5e"), device_count=32, process_count=8, require_files=False
        )


def test_tensor_parallelism_is_refused_for_the_kernels_that_would_repeat_work_per_rank():
    def validate(path, **execution):
        config = config_lib.load_file(path, "mesh=v5e-8")
        config.mesh = {"data": -1, "fsdp": 1, "tensor": 2}
        config.execution.update(execution)
        return config_lib.validate(config, chip=hardware.chip("v5e"), device_count=8,
                                   process_count=1, require_files=False)  # fmt: skip

    message = "execution.mlp_impl and execution.decoder_conv_impl Pallas kernels would repeat"
    with pytest.raises(config_lib.ConfigError, match=message):
        validate("configs/pretrain_as2m.py")  # the TPU's forms: both kernels
    with pytest.raises(config_lib.ConfigError, match=r"set execution.mlp_impl=xla, or tensor=1"):
        validate("configs/finetune_as20k.py")  # no decoder in fine-tuning
    run = validate("configs/pretrain_as2m.py", mlp_impl="xla", decoder_conv_impl="xla")
    assert run.mesh["tensor"] == 2 and run.execution.mlp == "xla"


def test_a_decoder_grid_beyond_the_chips_kernel_vmem_takes_the_xla_form():
    """The decoder kernel holds an example's whole grid: 10 s (64 × 8 patches) fits
    v4's 16 MiB, 20 s does not (the compiler's own count: BENCHMARKS.md) and
    takes XLA's form on v4 but not on v5p's 64 MiB; asked for by name it is refused."""

    def read(chip, frames, **execution):
        config = config_lib.load_file("configs/pretrain_as2m.py", "mesh=v5e-8")
        config.data.target_frames = frames
        config.execution.update(execution)
        return config_lib.read(config, hardware.chip(chip))

    v4_budget = hardware.chip("v4").kernel_vmem_bytes
    ten_seconds, twenty_seconds = read("v4", 1024), read("v4", 2048)
    assert ten_seconds.execution.decoder_conv == "pallas"
    assert config_lib.decoder_kernel_vmem(ten_seconds) <= v4_budget
    assert twenty_seconds.execution.decoder_conv == "xla"
    assert config_lib.decoder_kernel_vmem(twenty_seconds) > v4_budget
    assert read("v5p", 2048).execution.decoder_conv == "pallas"
    assert read("v4", 2048, dtype="float32").execution.decoder_conv == "xla"
    with pytest.raises(config_lib.ConfigError, match=r"needs about 26 MiB of VMEM at 2048 frames"):
        read("v4", 2048, decoder_conv_impl="pallas")
    finetuning = config_lib.load_file("configs/finetune_as20k.py", "mesh=v5e-8")
    finetuning.data.target_frames = 2048  # no decoder: nothing to decide
    assert config_lib.read(finetuning, hardware.chip("v4")).execution.decoder_conv_impl == "auto"


def test_the_mlp_kernel_is_chosen_where_its_weights_and_gradients_fit_the_chips_vmem():
    """AS-20K fine-tuning (513 tokens, bfloat16): ASDA base (768 → 2688) and EAT base
    (768 → 3072) fit v5p's 64 MiB, EAT large (1024 → 4096) does not (libtpu: 97 MiB)
    but fits a v6e kernel's 100 MiB; asked for by name it is refused, saying why."""

    def read(preset, model, **execution):
        config = config_lib.load_file("configs/finetune_as20k.py", f"mesh={preset},model={model}")
        config.execution.update(execution)
        topology = hardware.mesh_preset(preset).compile_topology
        return config_lib.read(config, hardware.of_topology(topology))

    assert read("v5p-128", "base").execution.mlp == "pallas"
    assert read("v5p-128", "eat_base").execution.mlp == "pallas"
    assert read("v5p-128", "eat_large").execution.mlp == "xla"
    assert read("v6e-8", "eat_large").execution.mlp == "pallas"
    assert read("tpu7x-8", "eat_large").execution.mlp == "xla"
    need = config_lib.mlp_kernel_vmem(read("v6e-8", "eat_large"))
    assert 96 * 2**20 < need <= hardware.chip("v6e").kernel_vmem_bytes
    with pytest.raises(config_lib.ConfigError, match=r"MLP kernel needs about 99 MiB .* v5p"):
        read("v5p-128", "eat_large", mlp_impl="pallas")


def test_the_decoder_backward_splits_over_the_cores_only_where_vmem_holds_the_split():
    """At base size (768 channels, 64 × 8 patches, bfloat16) v4's 16 MiB holds one core's
    blocks but not the two cores' split (the compiler ran out of VMEM there), v5p's
    64 MiB holds both; an odd batch stays on one core whatever the VMEM."""
    base = dict(cout=768, groups=16, k=3, itemsize=2)
    per_device = (192, 768, 512)
    v4, v5p = (hardware.chip(name).kernel_vmem_bytes for name in ("v4", "v5p"))
    one_core = decoder_kernel.vmem_bytes(768, 768, 512, 16, 3, 2)
    assert one_core <= v4 < decoder_kernel.vmem_bytes(768, 768, 512, 16, 3, 2, cores=2)
    assert decoder_kernel.backward_cores(per_device, **base, cores=2, vmem=v4) == 1
    assert decoder_kernel.backward_cores(per_device, **base, cores=2, vmem=v5p) == 2
    assert decoder_kernel.backward_cores((191, 768, 512), **base, cores=2, vmem=v5p) == 1
    assert decoder_kernel.backward_cores(per_device, **base, cores=2, vmem=None) == 2


def test_the_preset_batch_is_the_recipe_where_it_splits_else_whole_clips_per_chip():
    batch = lambda preset: (
        config_lib.load_file("configs/pretrain_as2m.py", f"mesh={preset}").data.batch_size
    )
    assert [batch(p) for p in ("gpu", "v4-8", "v4-32", "v5e-8")] == [48] * 4
    assert [batch(p) for p in ("v5e-32", "v5p-128", "v5e-256", "2x-v5e-256")] == [64, 64, 256, 512]
    assert [batch(p) for p in ("v6e-8", "v5e-1", "v6e-1", "tpu7x-8")] == [48] * 4
    assert [batch(p) for p in ("v6e-256", "tpu7x-128")] == [256, 128]


def run_compile(*flags: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "launch" / "compile.py"), *flags]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.subprocess
@needs_libtpu
def test_compile_refuses_what_cannot_run_before_compiling():
    split = run_compile(
        "--config=configs/pretrain_as2m.py:mesh=v5e-32", "--config.data.batch_size=48"
    )
    assert split.returncode == 2 and "use a multiple of 32" in split.stderr
    nowhere = run_compile("--config=configs/demo.py")
    assert nowhere.returncode == 2 and "names no topology: pass --topology" in nowhere.stderr


@pytest.mark.skipif(
    importlib.util.find_spec("jax_cuda12_plugin") is not None, reason="the CUDA plugin is here"
)
def test_a_gpu_topology_without_the_cuda_plugin_says_what_to_install():
    with pytest.raises(aot.CompilerMissing, match=r'pip install "jax\[cuda12\]==0.10.2"'):
        aot.abstract_devices("h100:1x1x8")


# ---------------------------------------------------------------------------- cuDNN


def test_the_chooser_holds_cudnn_to_its_limits():
    choose = lambda **kw: attention.choose_backend(
        "auto", **{"dtype": jnp.bfloat16, "head_dim": 128, "length": 103,
                   "chip": hardware.chip("h100")} | kw,
    )  # fmt: skip
    assert choose() == "cudnn"  # odd lengths too: padded to even
    assert choose(dtype=jnp.float32) == "xla"
    assert choose(head_dim=264) == "xla"  # wider than 256
    assert choose(head_dim=100) == "xla"  # not a multiple of 8
    assert choose(chip=hardware.HOST) == "xla"


@pytest.mark.parametrize("head_dim", [64, 128])
def test_every_length_reaches_cudnn_in_a_shape_its_training_check_accepts(head_dim):
    """jax's own check (the one that raised "Unsupported sequence length Q 103"),
    differentiated and with the bias jax.nn always passes, on what the cudnn backend
    hands it: every length from 1 to 1100; the unpadded odd lengths are refused."""
    check = cudnn_checks.check_is_flash_attention
    layout = cudnn_checks.AttentionLayout.BTNH.value
    for length in range(1, 1101):
        padded = length + (-length % attention.CUDNN_LENGTH_MULTIPLE)
        x = jax.ShapeDtypeStruct((2, padded, 4, head_dim), jnp.bfloat16)
        check(x, x, x, layout, 92800, has_bias=True, is_training=True)
    odd = jax.ShapeDtypeStruct((2, 103, 4, head_dim), jnp.bfloat16)
    with pytest.raises(NotImplementedError, match="Unsupported sequence length Q 103"):
        check(odd, odd, odd, layout, 92800, has_bias=True, is_training=True)


@pytest.mark.parametrize("length", [103, 104])
def test_the_cudnn_padding_leaves_attention_and_its_gradients_unchanged(length):
    """The cudnn backend's padding and length mask, run through XLA (no GPU here),
    against plain masked attention, values and gradients."""
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (2, length, 3, 16)) for key in keys)
    mask = jnp.arange(length)[None, :] < jnp.array([[length], [length - 7]])
    scale = 0.25

    def padded(q, k, v):
        return attention._cudnn_attention(q, k, v, mask, scale, implementation=None)

    def plain(q, k, v):
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
        scores = jnp.where(mask[:, None, None, :], scores, -jnp.inf)
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, -1), v)

    np.testing.assert_allclose(padded(q, k, v), plain(q, k, v), atol=2e-6)
    loss = lambda f: lambda *a: jnp.sum(f(*a) * v)
    got = jax.grad(loss(padded), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(plain), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=2e-5)


@pytest.mark.compile
@needs_cuda_plugin
def test_the_pretraining_step_compiles_for_h100s_with_cudnn_attention():
    config = tiny_run(
        "configs/pretrain_as2m.py", frames=1024, clips=8
    ).copy_and_resolve_references()
    config.mesh = dict(sharding.DATA_PARALLEL)
    step = aot.compile_step(config, aot.abstract_devices("h100:1x1x8"))
    assert step.attention_choices == ((103, "cudnn"), (513, "cudnn"))
    assert aot.report(step).chip == hardware.chip("h100")
    calls = hlo.custom_calls(step.compiled.as_text())
    assert calls["__cudnn$fmhaSoftmax"] > 0 and calls["__cudnn$fmhaSoftmaxBackward"] > 0


# ---------------------------------------------------------------------------- roofline


def test_the_roofline_counts_at_least_the_model_flops():
    """Pallas kernels are custom calls the compiler's cost analysis does not count: the
    compute time never drops below the model's FLOPs at peak, so MFU stays ≤ 1."""
    v5e = hardware.chip("v5e")
    report = functools.partial(
        aot.Report, chip=v5e, devices=8, clips=48, memory=aot.Memory(0, 0, 0, 0, 0), attention=()
    )
    text = hlo.HloSummary(
        [], {}, {"by_scope": {"x": 0.1 * v5e.hbm_bandwidth}, "other_memory": 0}
    )  # an HLO estimate of 0.1 s of HBM traffic
    hidden = report(compiler_flops=0.5 * v5e.peak_flops, analytic_flops=1.0 * v5e.peak_flops,
                    bytes_accessed=0.2 * v5e.hbm_bandwidth)  # fmt: skip
    assert hidden.step_seconds == text.hbm_step_seconds(hidden) == pytest.approx(1.0)
    assert hidden.mfu == text.hbm_mfu(hidden) == pytest.approx(1.0)
    memory_bound = report(compiler_flops=1.2 * v5e.peak_flops, analytic_flops=v5e.peak_flops,
                          bytes_accessed=3.0 * v5e.hbm_bandwidth)  # fmt: skip
    assert memory_bound.step_seconds == pytest.approx(3.0)
    assert memory_bound.mfu == pytest.approx(1 / 3)
    assert text.hbm_step_seconds(memory_bound) == pytest.approx(1.2)  # the compiler's FLOPs
    # a JSON report reads back as the same report, its figures recomputed
    saved = json.loads(json.dumps(aot.counts_of(memory_bound) | {"step_seconds": 99.0}))
    assert aot.report_from_counts(saved) == memory_bound
    with pytest.raises(ValueError, match="a report of chip 'v9': unknown chip"):
        aot.report_from_counts(saved | {"chip": "v9"})


def test_ironwood_reports_per_device_and_per_chip():
    """A TPU7x chip is two devices: memory and the roofline are per device, against half
    the chip's published figures; clips per second and chip-hours are per chip."""
    tpu7x = hardware.chip("tpu7x")
    assert tpu7x.devices_per_chip == 2 and not tpu7x.megacore
    assert tpu7x.hbm_bytes == 96 * 10**9 and tpu7x.peak_flops == pytest.approx(1153.5e12)
    rep = aot.Report(
        chip=tpu7x, devices=8, clips=48, memory=aot.Memory(48 * 10**9, 0, 0, 0, 0), attention=(),
        compiler_flops=tpu7x.peak_flops, analytic_flops=tpu7x.peak_flops, bytes_accessed=0.0,
    )  # fmt: skip
    assert rep.chips == 4 and rep.headroom == pytest.approx(0.5) and rep.step_seconds == 1.0
    assert rep.clips_per_second_per_chip == pytest.approx(12.0)  # 6 clips per device, 2 per chip
    assert hardware.MESH_PRESETS["tpu7x-8"].devices == 8  # a 2x2x1 slice of 4 chips
