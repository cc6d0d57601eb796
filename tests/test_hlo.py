"""The HLO text readers of asda_jax/hlo.py (what launch/compile.py prints beside the
compiler's own analyses), on hand-written HLO: their forms of replica groups, shapes,
memory spaces and op names."""

from asda_jax import hlo


def test_replica_groups_of_every_form():
    mesh_form = "replica_groups=mesh['axis_0'=2,'axis_1'=3] {'axis_0'}, use_global_device_ids"
    assert hlo.replica_groups(mesh_form) == [[0, 3], [1, 4], [2, 5]]
    both = "replica_groups=mesh['axis_0'=2,'axis_1'=3] {'axis_0','axis_1'}"
    assert hlo.replica_groups(both) == [[0, 1, 2, 3, 4, 5]]
    assert hlo.replica_groups("replica_groups=[2,4]<=[8], x") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert hlo.replica_groups("replica_groups=[4,2]<=[2,4]T(1,0)") == [
        [0, 4], [1, 5], [2, 6], [3, 7]
    ]  # fmt: skip
    assert hlo.replica_groups("replica_groups={{0,2},{1,3}}") == [[0, 2], [1, 3]]


def test_array_bytes_of_hlo_shapes():
    assert hlo.array_bytes("bf16[4,128]{1,0:T(8,128)(2,1)}") == 4 * 128 * 2
    assert hlo.array_bytes("(f32[3]{0}, /*index=1*/s32[], pred[2,2])") == 12 + 4 + 4


def test_traffic_counts_each_op_once_and_splits_memory_spaces():
    op_name = "jit(<lambda>)/transpose(jvp(Encoder.contextualize))/blocks_3/mlp/fc1/add"
    program = f"""HloModule m

ENTRY %main (p: f32[256]) -> f32[256] {{
  %p = f32[256]{{0}} parameter(0)
  %s = ((f32[256]{{0}}), f32[128]{{0:S(1)}}, s32[]{{:S(2)}}) slice-start(%p), slice={{[0:128]}}
  %d = f32[128]{{0:S(1)}} slice-done(%s)
  %f = f32[256]{{0}} fusion(%p, %d), kind=kLoop, calls=%c, metadata={{op_name="{op_name}"}}
  ROOT %g = f32[256]{{0}} copy(%f)
}}
"""
    got = hlo.traffic(program)
    # the fusion reads p (1 KiB) and d (on-chip), writes 1 KiB; the copy 1 KiB each way
    assert got["by_opcode"] == {"fusion": 2048, "copy": 2048, "slice-start": 0}
    assert got["other_memory"] == 2 * 512 + 512  # the slice moved, and read by the fusion
    assert got["by_scope"]["backward Encoder.contextualize/mlp/fc1"] == 2048


def test_pallas_kernels_are_named_by_the_module_they_run_in():
    def call(op_name):
        return (
            f'  %c = f32[8]{{0}} custom-call(%p), custom_call_target="tpu_custom_call", '
            f'metadata={{op_name="{op_name}"}}'
        )

    program = "\n".join(
        [
            call("jit(f)/jvp(Encoder.contextualize)/blocks_0/attn/shard_map/pallas_call"),
            call("jit(f)/transpose(jvp(Encoder.contextualize))/blocks_1/mlp/shard_map/pallas_call"),
            call("jit(f)/jvp(Encoder)/blocks_0/attn/splash_mha_fwd/pallas_call"),
            call("jit(f)/transpose(jvp(Decoder))/shard_map/pallas_call"),
            "  %splash_mha_dkv_segmented.3 = f32[8]{0} custom-call(%p), "
            'custom_call_target="tpu_custom_call"',
            '  %d = f32[8]{0} custom-call(%p), custom_call_target="Sharding"',
        ]
    )
    assert hlo.pallas_kernels(program) == {
        ("attention", "forward"), ("mlp", "backward"), ("splash", "forward"),
        ("splash", "backward"), ("decoder", "backward"),
    }  # fmt: skip
