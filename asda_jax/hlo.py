"""What a compiled program's HLO text says: its collectives, custom calls and where its
memory traffic goes, read from ``compiled.as_text()`` with regular expressions. The
text's form belongs to the compiler's version, so these readers are checked against the
version pinned in ``requirements.txt`` (tests/test_hlo.py), and what ``aot.py`` reports
from the compiler's own analyses never depends on them.

``summary`` gathers what ``launch/compile.py`` prints beside ``aot.py``'s report:
collectives per kind, group size and whether they cross slices; custom-call targets
(the Pallas kernels are ``tpu_custom_call``); and the HLO's op traffic per scope and
opcode, in HBM and in on-chip memory spaces, with the roofline that traffic gives (an
estimate).
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import math
import re
from collections.abc import Iterator

import numpy as np

from asda_jax import aot

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2}
_DTYPE_BYTES |= {"f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_ARRAY = re.compile(r"\b(pred|[fsu]\d+|bf16)\[([\d,]*)\]")
# an HLO instruction line: name, shape, opcode, the rest
_NAMED = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*)$")
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](T\(([\d,]+)\))?")
_LIST_GROUPS = re.compile(r"replica_groups=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)\}")


def array_bytes(shape_text: str) -> int:
    """Bytes of every array in an HLO shape (``bf16[4,128]`` or a tuple of them)."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape_text):
        count = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        total += count * _DTYPE_BYTES.get(dtype, 4)
    return total


def replica_groups(attributes: str) -> list[list[int]] | None:
    """The replica groups of a collective's attributes: the mesh form
    (``mesh['axis_0'=4,'axis_1'=2] {'axis_0'}``: devices varying over the named axes of
    an iota grid form a group), the iota form (``[2,4]<=[8]``) or a list."""
    if m := _MESH_GROUPS.search(attributes):
        axes = [a.split("=") for a in m.group(1).split(",")]
        names = [name.strip("' ") for name, _ in axes]
        sizes = [int(size) for _, size in axes]
        grouped = [names.index(a.strip("' ")) for a in m.group(2).split(",") if a.strip()]
        ids = np.arange(math.prod(sizes)).reshape(sizes)
        rest = [i for i in range(len(sizes)) if i not in grouped]
        size = math.prod(sizes[i] for i in grouped)
        return ids.transpose(rest + grouped).reshape(-1, size).tolist()
    if m := _IOTA_GROUPS.search(attributes):
        groups, size = int(m.group(1)), int(m.group(2))
        dims = [int(d) for d in m.group(3).split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if m.group(5):
            ids = ids.transpose([int(d) for d in m.group(5).split(",")])
        return ids.reshape(groups, size).tolist()
    if m := _LIST_GROUPS.search(attributes):
        return [
            [int(i) for i in g.split(",") if i] for g in re.findall(r"\{([\d,]*)\}", m.group(1))
        ]
    return None


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str
    bytes: int  # of its result, per chip
    group_size: int | None
    crosses_slices: bool | None  # None: a single slice


_DCN_TRANSFER = re.compile(r'_xla_megascale_transfer_type="(\w+)"')


def collectives_of(hlo_text: str, devices) -> list[Collective]:
    """Every collective of a compiled program's HLO (async pairs once, by their start).
    ``devices`` are the program's devices in partition order (to tell slices apart).
    Across TPU slices the compiler reduces within each slice over ICI, then hands the
    partial results to the multi-slice runtime as host ``send``/``recv`` pairs marked
    ``_xla_megascale_transfer_type``: each send is one collective over the data-centre
    network ("dcn-all-reduce", ...), counted as crossing slices."""
    slices = [getattr(d, "slice_index", 0) for d in devices]
    multi_slice = len(set(slices)) > 1
    found = []
    for line in hlo_text.splitlines():
        m = _NAMED.match(line)
        if not m:
            continue
        _, shape, opcode, rest = m.groups()
        if opcode == "send" and (dcn := _DCN_TRANSFER.search(rest)):
            kind = "dcn-" + dcn.group(1).lower().replace("_", "-")
            data = _top_level(shape)[0]  # (data, context, token)
            found.append(Collective(kind, array_bytes(data), len(set(slices)), True))
            continue
        kind = opcode.removesuffix("-start")
        if kind not in COLLECTIVES:
            continue
        groups = replica_groups(rest)
        crosses = None
        if multi_slice and groups:
            crosses = any(len({slices[i] for i in g}) > 1 for g in groups if g)
        size = len(groups[0]) if groups and groups[0] else None
        found.append(Collective(kind, array_bytes(_result_shape(shape, opcode)), size, crosses))
    return found


def summarise_collectives(found: list[Collective]) -> list[dict]:
    """Rows of (kind, group size, crosses slices): count and bytes per chip."""
    rows = collections.defaultdict(lambda: [0, 0])
    for c in found:
        key = (c.kind, c.group_size, c.crosses_slices)
        rows[key][0] += 1
        rows[key][1] += c.bytes
    return [
        dict(kind=k, group_size=g, crosses_slices=x, count=n, bytes=b)
        for (k, g, x), (n, b) in sorted(rows.items(), key=lambda kv: str(kv[0]))
    ]


def custom_calls(hlo_text: str) -> collections.Counter:
    """Custom-call targets of a compiled program and how often each appears."""
    return collections.Counter(re.findall(r'custom_call_target="([^"]+)"', hlo_text))


# ---------------------------------------------------------------------------- traffic

_OPERAND = re.compile(r"%([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_MEMORY_SPACE = re.compile(r"S\((\d+)\)")
_NO_TRAFFIC = {"parameter", "get-tuple-element", "bitcast", "tuple", "constant", "after-all"}
_ASYNC_DONE = re.compile(r"-done$")


def _top_level(shape_text: str) -> list[str]:
    """The elements of an HLO tuple shape (a non-tuple shape: itself)."""
    if not shape_text.startswith("("):
        return [shape_text]
    parts, depth, current = [], 0, ""
    for ch in shape_text[1:-1]:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    return [*parts, current.strip()]


def _result_shape(shape_text: str, opcode: str) -> str:
    """The result in an instruction's shape: an async start's shape is (operands,
    result[, context...]), operands and results each one array or one tuple, except an
    all-reduce-start's, which is its result alone."""
    if not opcode.endswith("-start") or opcode == "all-reduce-start":
        return shape_text
    return _top_level(shape_text)[1]


def _shape_bytes(shape_text: str) -> tuple[int, int]:
    """(bytes in the default memory space, bytes in others) of an HLO shape; a layout's
    ``S(n)``, n > 0, places an array in another memory space (on TPU: on-chip)."""
    main = other = 0
    for piece in _top_level(shape_text):
        if piece.startswith("("):
            inner = _shape_bytes(piece)
            main, other = main + inner[0], other + inner[1]
            continue
        space = _MEMORY_SPACE.search(piece)
        if space and space.group(1) != "0":
            other += array_bytes(piece)
        else:
            main += array_bytes(piece)
    return main, other


def scope_of(op_name: str) -> str:
    """A readable place for an op: pass (forward/backward) and module path without
    block numbers, e.g. "backward Encoder.contextualize/attn/qk"."""
    name = op_name.removeprefix("jit(<lambda>)/")
    backward = name.startswith("transpose(")
    parts = [p for p in name.split("/") if p]
    module = [re.sub(r"^(transpose|jvp|vmap|remat|checkpoint)\(|\)+$", "", p) for p in parts]
    module = [re.sub(r"^(transpose|jvp)\(", "", p) for p in module]
    kept = [p for p in module[:-1] if not re.fullmatch(r"blocks_\d+", p)][:3]
    where = "/".join(kept) or "(top)"
    return f"{'backward' if backward else 'forward'} {where}"


def traffic(hlo_text: str) -> dict[str, dict[str, float]]:
    """Bytes each top-level op of the entry computation reads and writes, summed per
    ``scope_of`` its op name and per opcode: {"by_scope": .., "by_opcode": ..,
    "other_memory": bytes in other memory spaces}. An estimate of where a program's
    memory traffic goes (a fusion's operands and result; an asynchronous copy or slice
    counted at its start, as its result read and written)."""
    entry = hlo_text[hlo_text.index("\nENTRY") :]
    entry = entry[: entry.index("\n}\n")] if "\n}\n" in entry else entry
    shapes: dict[str, tuple[int, int]] = {}
    by_scope: collections.Counter = collections.Counter()
    by_opcode: collections.Counter = collections.Counter()
    other_memory = 0
    for line in entry.splitlines()[1:]:
        m = _NAMED.match(line)
        if not m:
            continue
        name, shape, opcode, rest = m.groups()
        shapes[name] = _shape_bytes(shape)
        if opcode in _NO_TRAFFIC or _ASYNC_DONE.search(opcode):
            continue
        if opcode.endswith("-start"):  # moves its result: read, then written
            moved = _shape_bytes(_result_shape(shape, opcode))
            main, other = 2 * moved[0], 2 * moved[1]
        else:
            args = rest.split("), ", 1)[0]
            operands = [shapes.get(o, (0, 0)) for o in _OPERAND.findall(args)]
            main = shapes[name][0] + sum(o[0] for o in operands)
            other = shapes[name][1] + sum(o[1] for o in operands)
        other_memory += other
        op_name = _OP_NAME.search(rest)
        by_scope[scope_of(op_name.group(1)) if op_name else "(no name)"] += main
        by_opcode[opcode] += main
    return {"by_scope": dict(by_scope), "by_opcode": dict(by_opcode), "other_memory": other_memory}


# The module a Pallas kernel runs in, by the op name of its custom call (first match).
_KERNEL_SCOPES = (
    ("splash", "splash_mha"),
    ("decoder", "Decoder"),
    ("mlp", "/mlp/"),
    ("attention", "/attn/"),
)
_SPLASH_BACKWARD = re.compile(r"splash_mha_d(q|kv)")  # its gradients' kernels


# an instruction, a computation's header or its closing brace, the module's header
_INSTRUCTION_START = re.compile(r"\s*(ROOT\s+)?%[\w.\-]+ = |%|}$|HloModule|$")


def _instructions(hlo_text: str) -> Iterator[str]:
    """The HLO text's lines, an instruction whose attributes run over several lines
    (a kernel's metadata) joined into one."""
    pending = None
    for line in hlo_text.splitlines():
        if pending is not None and not _INSTRUCTION_START.match(line):
            pending += line
            continue
        if pending is not None:
            yield pending
        pending = line
    if pending is not None:
        yield pending


def _pallas_calls(hlo_text: str) -> Iterator[tuple[str, str, str]]:
    """(kernel, pass, instruction line) of every Mosaic custom call (``tpu_custom_call``):
    which of the project's kernels it is ("splash", "decoder", "mlp", "attention": the
    short kernel, or "other") and whether it runs in the forward or the backward pass."""
    for line in _instructions(hlo_text):
        if 'custom_call_target="tpu_custom_call"' not in line:
            continue
        named, op_name = _NAMED.match(line), _OP_NAME.search(line)
        # splash's calls carry no op name, but their instructions are named after its kernels
        name = (named.group(1) if named else "") + " " + (op_name.group(1) if op_name else "")
        kernel = next((k for k, scope in _KERNEL_SCOPES if scope in name), "other")
        backward = "transpose(" in name or _SPLASH_BACKWARD.search(name)
        yield kernel, "backward" if backward else "forward", line


def pallas_kernels(hlo_text: str) -> set[tuple[str, str]]:
    """(kernel, pass) of every Mosaic custom call (``_pallas_calls``)."""
    return {(kernel, way) for kernel, way, _ in _pallas_calls(hlo_text)}


_MOSAIC_BODY = re.compile(r'"body":"([A-Za-z0-9+/=]+)"')
_SEMANTICS = re.compile(rb"dimension_semantics<(\w+)>")


def pallas_grid_semantics(hlo_text: str) -> dict[tuple[str, str], set[str]]:
    """(kernel, pass) → the grid dimension semantics ("parallel", "arbitrary") its
    Mosaic modules declare: read from each call's serialized kernel (MLIR bytecode keeps
    each distinct attribute once, so this is which kinds occur, not their order)."""
    found: dict[tuple[str, str], set[str]] = {}
    for kernel, way, line in _pallas_calls(hlo_text):
        body = _MOSAIC_BODY.search(line)
        kinds = _SEMANTICS.findall(base64.b64decode(body.group(1))) if body else []
        found.setdefault((kernel, way), set()).update(k.decode() for k in kinds)
    return found


@dataclasses.dataclass(frozen=True)
class HloSummary:
    """What the HLO text of one compiled step says, per chip."""

    collectives: list[dict]
    custom_calls: dict[str, int]
    traffic: dict  # ``traffic`` of the HLO

    @property
    def hbm_traffic(self) -> float:
        """The HLO's op traffic in the default memory space (HBM)."""
        return float(sum(self.traffic["by_scope"].values()))

    @property
    def on_chip_traffic(self) -> float:
        """In other memory spaces (TPU: on-chip), not HBM."""
        return float(self.traffic["other_memory"])

    def hbm_step_seconds(self, rep: aot.Report) -> float | None:
        """Roofline with this traffic as the bytes (an estimate that leaves out what
        moves within on-chip memory); None without the chip's figures."""
        bandwidth = rep.chip.hbm_bandwidth
        if bandwidth is None or rep.compute_seconds is None:
            return None
        return max(rep.compute_seconds, self.hbm_traffic / bandwidth)

    def hbm_mfu(self, rep: aot.Report) -> float | None:
        seconds = self.hbm_step_seconds(rep)
        return None if seconds is None else rep.analytic_flops / (seconds * rep.chip.peak_flops)


def summary(hlo_text: str, devices) -> HloSummary:
    """The collectives, custom calls and traffic of a compiled program's HLO text;
    ``devices`` in partition order (to tell slices apart)."""
    return HloSummary(
        summarise_collectives(collectives_of(hlo_text, devices)),
        dict(custom_calls(hlo_text)),
        traffic(hlo_text),
    )


def counts_of(text: HloSummary) -> dict:
    """A summary as JSON (``from_counts`` reads it back)."""
    return dict(
        collectives=text.collectives, custom_calls=text.custom_calls, traffic=text.traffic,
        hbm_traffic=text.hbm_traffic, on_chip_traffic=text.on_chip_traffic,
    )  # fmt: skip


def from_counts(saved: dict) -> HloSummary:
    return HloSummary(saved["collectives"], saved["custom_calls"], saved["traffic"])
