"""int8 convolutions on the CPU's integer dot-product instructions.

Why a rewrite and a hand-written schedule: an int8 convolution lowered by ``R.nn.conv2d``
multiplies widened int32 lanes, as many per instruction as fp32 FMAs, so it is no faster than
float32. Only the dot-product instructions make int8 cheaper: each sums 4 byte products into
one int32 lane, for 16 lanes at once (x86 AVX512-VNNI ``vpdpbusd``) or 4 (AArch64 ``sdot``,
Cortex-A76 / rpi5; the A72 of rpi4 has none, and ``smull + smlal2 + sadalp`` stands in
for it, 16 products in three instructions; an x86 core without VNNI sums byte pairs widened
to int16 with AVX2 ``vpmaddwd``). Using them needs the weights packed as
``[O/L, KH, KW, C/4, G, L, 4/G]`` (``L`` lanes, ``G`` groups of each lane's 4 bytes), so
:func:`use_int8_dot` replaces each int8
convolution by a TE computation on packed operands, and :func:`schedule` tiles it and
tensorizes the ``L x 4`` inner block. The packing depends on the weights only and is done at
build time (``compiler.int8.precompute_params``).

``vpdpbusd`` multiplies *unsigned* bytes by signed ones: the int8 activations ``a`` are fed as
``a + 128`` (u8, padding too), and ``128 * sum(w)`` is subtracted per output channel. Both
are exact in int32, so every form gives the int32 sums of ``R.nn.conv2d`` bit for bit.

TVM 0.27's own ``VNNI_DOT_16x4_INTRIN`` passes ``<16 x i32>`` operands to
``llvm.x86.avx512.vpdpbusd.512``, which the bundled LLVM declares with ``<64 x i8>`` ones
("Call parameter type does not match function signature"): :func:`intrin` registers the same
description with the operands reinterpreted as bytes. The sdot one is TVM's.

Which kind a target gets is read from its ``mattr`` (:func:`int8_dot`), never assumed: build
hosts differ from day to day (some x86 ones are AVX2-only and get ``avx2``).

TVM is imported inside the functions that use it: importing it takes seconds (and
loads torch), and this module is imported by commands that never compile.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

from lprnet_edge.compiler.injective import parallel_vectorized
from lprnet_edge.compiler.int8 import is_int8_conv, is_op
from lprnet_edge.compiler.tvm_import import import_tvm_compiler


@dataclass(frozen=True)
class DotKind:
    """One integer dot-product instruction: ``lanes`` int32 outputs per instruction, each the
    sum of 4 products; ``shift``: added to the int8 activations (128 when the instruction
    wants them unsigned); ``accumulators``: vector registers the schedule may tile;
    ``groups``: how the 4 bytes of each lane are split in a packed weight block, which is
    ``[groups, lanes, 4 / groups]`` (the NEON sequence multiplies pairs, see :func:`_neon`)."""

    name: str
    lanes: int
    shift: int
    accumulators: int
    description: str
    groups: int = 1

    @property
    def group_size(self) -> int:
        """Bytes of one output lane's 4 that lie together in a packed weight block."""
        return 4 // self.groups

    @property
    def conv_block(self) -> str:
        return f"dot_conv_{self.name}"

    @property
    def pad_block(self) -> str:
        return f"dot_pad_{self.name}"

    @property
    def act_dtype(self) -> str:
        return "uint8" if self.shift else "int8"


VNNI = DotKind("vnni", 16, 128, 24, "AVX512-VNNI vpdpbusd (64 u8 x s8 products per instruction)")
SDOT = DotKind("sdot", 4, 0, 24, "AArch64 sdot (16 s8 x s8 products per instruction)")
NEON = DotKind("neon", 4, 0, 16, "AArch64 NEON smull + smlal2 + sadalp (no sdot on this core)",
               groups=2)
AVX2 = DotKind("avx2", 8, 0, 12, "AVX2 vpmovsxbw + vpmaddwd (16 s16 x s16 products per "
               "instruction; no VNNI on this CPU)", groups=2)
KINDS = {k.name: k for k in (VNNI, SDOT, NEON, AVX2)}


def int8_dot(target: Any) -> str | None:
    """The dot-product kind (a key of :data:`KINDS`) ``target`` (a ``tvm.target.Target``)
    gives int8 convolutions, from its ``mattr``; None: plain int32 multiplies."""
    attrs = target.attrs if hasattr(target, "attrs") else {}
    mattr = {str(m) for m in attrs.get("mattr", [])} if "mattr" in attrs else set()
    triple = str(attrs.get("mtriple", "")) if "mtriple" in attrs else ""
    if str(target.kind.name) != "llvm":
        return None
    if triple.startswith("aarch64"):
        return "sdot" if "+dotprod" in mattr else "neon" if "+neon" in mattr else None
    if triple and not triple.startswith("x86_64"):
        return None
    if {"+avx512vnni", "+avx512bw"} <= mattr:
        return "vnni"
    from tvm.target import codegen  # what mcpu implies, less what mattr switches off

    return "avx2" if codegen.target_has_features("avx2", target) else None


def intrin(kind: DotKind) -> str:
    """The tensor intrinsic of ``kind``, registered once per process.

    Registered here rather than imported from ``tvm.s_tir.tensor_intrin``: that package
    parses every intrinsic of every backend (CUDA included) at import, tens of seconds with torch
    loaded. The sdot implementation is TVM's (arm_cpu.py); TVM's NEON one (``smull + saddlp
    + addp``) takes twice the instructions of :func:`_neon`."""
    import_tvm_compiler()
    from tvm.s_tir import TensorIntrin

    name = f"lprnet_edge_dot_{kind.name}"
    try:
        TensorIntrin.get(name)
    except (ValueError, RuntimeError):
        desc, impl = _INTRIN_IMPLS[kind.name]()
        TensorIntrin.register(name, desc, impl, override=True)
    return name


def _desc(kind: DotKind) -> Any:
    """``C[i] += sum_k A[k] * B[k / q, i, k % q]`` (``q`` = ``kind.group_size``) for
    ``kind.lanes`` int32 outputs and 4 bytes each: the weight block as :func:`_pack_te`
    lays it out. With one group the group axis is a constant 0 (TE drops unit loops), so the
    description has no loop over it either."""
    from tvm.script import tirx as T

    lanes, g, q, a_dtype = kind.lanes, kind.groups, kind.group_size, kind.act_dtype
    if g == 1:
        @T.prim_func(s_tir=True)
        def single(a: T.handle, b: T.handle, c: T.handle) -> None:
            A = T.match_buffer(a, (4,), a_dtype, offset_factor=1)
            B = T.match_buffer(b, (1, lanes, 4), "int8", offset_factor=1)
            C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
            with T.sblock("root"):
                T.reads(C[0:lanes], A[0:4], B[0:1, 0:lanes, 0:4])
                T.writes(C[0:lanes])
                for i in T.serial(0, lanes):
                    for k in T.serial(0, 4):
                        with T.sblock("update"):
                            vi, vk = T.axis.remap("SR", [i, k])
                            C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(
                                B[0, vi, vk], "int32")

        return single

    @T.prim_func(s_tir=True)
    def grouped(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), a_dtype, offset_factor=1)
        B = T.match_buffer(b, (g, lanes, q), "int8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:g, 0:lanes, 0:q])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                for p in T.serial(0, g):
                    for k in T.serial(0, q):
                        with T.sblock("update"):
                            vi, vp, vk = T.axis.remap("SRR", [i, p, k])
                            C[vi] = C[vi] + T.cast(A[vp * q + vk], "int32") * T.cast(
                                B[vp, vi, vk], "int32")

    return grouped


def _broadcast_dot(kind: DotKind, llvm_intrin: str) -> tuple[Any, Any]:
    """One instruction ``C[lanes] += A[4] . B[lanes, 4]``: the 4 bytes of ``A`` broadcast to
    every lane (``vpdpbusd`` for VNNI, ``sdot`` for AArch64), operands as byte vectors."""
    lanes, n = kind.lanes, 4 * kind.lanes

    def update(T: Any, A: Any, B: Any, C: Any) -> Any:
        return T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id(llvm_intrin), C.vload([0], dtype=f"int32x{lanes}"),
            T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], f"{kind.act_dtype}x4"),
                                                    dtype="int32"), lanes), dtype=f"int8x{n}"),
            B.vload([0, 0, 0], dtype=f"int8x{n}"), dtype=f"int32x{lanes}")

    return _desc(kind), _impl(kind, update)


def _impl(kind: DotKind, update: Any) -> Any:
    """The implementation of ``kind`` on its buffers (``A[4]``, the packed weight block
    ``[groups, lanes, 4 / groups]``, ``C[lanes]``): ``C`` becomes ``update(T, A, B, C)``,
    one expression (a name bound in an intrinsic's body becomes a buffer, which the runtime
    allocates per parallel task)."""
    from tvm.script import tirx as T

    lanes, g, q, a_dtype = kind.lanes, kind.groups, kind.group_size, kind.act_dtype

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), a_dtype, offset_factor=1)
        B = T.match_buffer(b, (g, lanes, q), "int8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:g, 0:lanes, 0:q])
            T.writes(C[0:lanes])
            C[T.ramp(T.int32(0), 1, lanes)] = update(T, A, B, C)

    return impl


def _vnni() -> tuple[Any, Any]:
    return _broadcast_dot(VNNI, "llvm.x86.avx512.vpdpbusd.512")


def _sdot() -> tuple[Any, Any]:
    return _broadcast_dot(SDOT, "llvm.aarch64.neon.sdot.v4i32.v16i8")


def _neon() -> tuple[Any, Any]:
    """``C[4] += A[4] . B[4, 4]`` without a dot-product instruction, for 16 byte products
    in three: ``smull`` multiplies the first pair of ``A``'s bytes with the first pair of each
    lane's (8 int16 products), ``smlal2`` adds the second pairs' into the same int16 lanes,
    and ``sadalp`` adds neighbouring int16 lanes into the int32 accumulators. Two products of
    int8 codes in [-127, 127] sum to at most 32258: the int16 lanes cannot overflow. The
    weight block is ``[2, 4, 2]`` (pair, lane, byte) so that each half is one operand."""

    def update(T: Any, A: Any, B: Any, C: Any) -> Any:
        return C.vload([0], dtype="int32x4") + T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.saddlp.v4i32.v8i16"),
            _pair_products(T, A, B, 0) + _pair_products(T, A, B, 1), dtype="int32x4")

    return _desc(NEON), _impl(NEON, update)


def _pair_products(T: Any, A: Any, B: Any, pair: int) -> Any:
    """``smull``: the ``pair``-th 2 bytes of ``A`` times the ``pair``-th 2 bytes of each of
    the 4 lanes, as 8 int16. An expression, not a statement: a name bound in an intrinsic's
    body becomes a buffer, which the runtime allocates per parallel task."""
    both = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"), 2),
                         dtype="int16x4")
    a = T.reinterpret(T.Shuffle([both], [pair, pair, pair, pair]), dtype="int8x8")
    return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.smull.v8i16"),
                                   a, B.vload([pair, 0, 0], dtype="int8x8"), dtype="int16x8")


def _avx2() -> tuple[Any, Any]:
    """``C[8] += A[4] . B[8, 4]`` on AVX2 without VNNI: ``vpmaddwd`` multiplies 16 int16
    pairs and adds each pair into an int32 lane, so each of ``A``'s two byte pairs,
    sign-extended and broadcast to the 8 lanes, meets the same pair of each lane's bytes
    (one ``vpmovsxbw`` load per pair). The int16 products and their pair sums are exact. The
    weight block is ``[2, 8, 2]`` (pair, lane, byte), as for :func:`_neon`."""

    def update(T: Any, A: Any, B: Any, C: Any) -> Any:
        return (C.vload([0], dtype="int32x8") + _pair_madd(T, A, B, 0)
                + _pair_madd(T, A, B, 1))

    return _desc(AVX2), _impl(AVX2, update)


def _pair_madd(T: Any, A: Any, B: Any, pair: int) -> Any:
    """``vpmaddwd``: the ``pair``-th 2 bytes of ``A`` dotted with the ``pair``-th 2 bytes
    of each of the 8 lanes, as 8 int32 (an expression, see :func:`_pair_products`)."""
    pairs = T.reinterpret(T.Cast("int16x4", A.vload([0], "int8x4")), dtype="int32x2")
    a = T.reinterpret(T.Shuffle([pairs] * 4, [pair + 2 * i for i in range(4)] * 2),
                      dtype="int16x16")
    b = T.Cast("int16x16", B.vload([pair, 0, 0], dtype="int8x16"))
    return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), a, b,
                                   dtype="int32x8")


_INTRIN_IMPLS = {"vnni": _vnni, "sdot": _sdot, "neon": _neon, "avx2": _avx2}


# ---------------------------------------------------------------- the computation


def _ceil(n: int, m: int) -> int:
    return -(-n // m) * m


def _pack_te(w: Any, kind: DotKind) -> Any:
    """HWIO int8 weights -> ``[O/L, KH, KW, C/4, G, L, 4/G]`` (``G`` = ``kind.groups``;
    zero-padded to whole blocks)."""
    from tvm import te, tirx

    kh_, kw_, c_, o_ = (int(d) for d in w.shape)
    lanes, q = kind.lanes, kind.group_size

    def value(ob: Any, r: Any, s: Any, cb: Any, cp: Any, oi: Any, ck: Any) -> Any:
        c, o = cb * 4 + cp * q + ck, ob * lanes + oi
        return tirx.if_then_else(tirx.all(o < o_, c < c_),
                                 w[r, s, tirx.min(c, c_ - 1), tirx.min(o, o_ - 1)],
                                 tirx.const(0, "int8"))

    shape = (_ceil(o_, lanes) // lanes, kh_, kw_, _ceil(c_, 4) // 4, kind.groups, lanes, q)
    return te.compute(shape, value, name="dot_pack")


def _offset_te(w: Any, kind: DotKind) -> Any:
    """``shift * sum(w)`` per output channel: what the activations' shift adds."""
    from tvm import te

    kh_, kw_, c_, o_ = (int(d) for d in w.shape)
    r = te.reduce_axis((0, kh_), "r")
    s = te.reduce_axis((0, kw_), "s")
    c = te.reduce_axis((0, c_), "c")
    total = te.compute((o_,), lambda o: te.sum(w[r, s, c, o].astype("int32"), axis=[r, s, c]),
                       name="dot_wsum")
    return te.compute((o_,), lambda o: total[o] * kind.shift, name="dot_offset")


def _conv_te(x: Any, packed: Any, offset: Any = None, *, pad: tuple[int, int, int, int],
             n_out: int, kind: DotKind) -> Any:
    """``conv2d(x, w)`` (int8 NHWC, stride 1, int32 out, ``n_out`` channels) from
    :func:`_pack_te` (and :func:`_offset_te` when ``kind`` shifts) of ``w``."""
    from tvm import te, tirx

    n_, h_, w_, c_ = (int(d) for d in x.shape)
    ob_, kh_, kw_, cb_ = (int(d) for d in packed.shape[:4])
    top, left, bottom, right = pad
    hp, wp = h_ + top + bottom, w_ + left + right
    zero = tirx.const(kind.shift, kind.act_dtype)

    def padded(n: Any, h: Any, ww: Any, c: Any) -> Any:
        inside = tirx.all(h >= top, h < h_ + top, ww >= left, ww < w_ + left, c < c_)
        val = x[n, tirx.max(tirx.min(h - top, h_ - 1), 0),
                tirx.max(tirx.min(ww - left, w_ - 1), 0), tirx.min(c, c_ - 1)]
        if kind.shift:
            val = (val.astype("int32") + kind.shift).astype(kind.act_dtype)
        return tirx.if_then_else(inside, val, zero)

    xp = te.compute((n_, hp, wp, cb_ * 4), padded, name=kind.pad_block)
    r = te.reduce_axis((0, kh_), "r")
    s = te.reduce_axis((0, kw_), "s")
    cb = te.reduce_axis((0, cb_), "cb")
    ck = te.reduce_axis((0, kind.group_size), "ck")
    # One group: no group axis at all (a unit loop would not match the intrinsic's loops).
    cp = te.reduce_axis((0, kind.groups), "cp") if kind.groups > 1 else tirx.const(0, "int32")
    axes = [r, s, cb, cp, ck] if kind.groups > 1 else [r, s, cb, ck]
    q = kind.group_size
    conv = te.compute(
        (n_, hp - kh_ + 1, wp - kw_ + 1, ob_, kind.lanes),
        lambda n, h, ww, ob, oi: te.sum(
            xp[n, h + r, ww + s, cb * 4 + cp * q + ck].astype("int32")
            * packed[ob, r, s, cb, cp, oi, ck].astype("int32"), axis=axes),
        name=kind.conv_block)
    lanes = kind.lanes

    def out(n: Any, h: Any, ww: Any, o: Any) -> Any:
        acc = conv[n, h, ww, o // lanes, o % lanes]
        return acc - offset[o] if offset is not None else acc

    return te.compute((n_, hp - kh_ + 1, wp - kw_ + 1, n_out), out, name="dot_out")


def _plain_conv(call: Any) -> tuple[int, int, int, int] | None:
    """The padding of an int8 NHWC/HWIO convolution the dot form covers (stride 1, no
    dilation, one group), else None."""
    a = call.attrs
    if not is_int8_conv(call) or str(a.data_layout) != "NHWC" or str(a.kernel_layout) != "HWIO":
        return None
    if any(int(v) != 1 for v in [*a.strides, *a.dilation]) or int(a.groups) != 1:
        return None
    top, left, bottom, right = (int(v) for v in a.padding)
    return top, left, bottom, right


def use_int8_dot(mod: Any, kind_name: str) -> tuple[Any, int]:
    """Replace each int8 NHWC convolution of ``mod`` by its dot-product form for
    ``KINDS[kind_name]``: ``call_te`` for the weight packing (and offset), which depend on the
    weights only, and one for the convolution. Returns the module and the number replaced."""
    import_tvm_compiler()
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    kind = KINDS[kind_name]
    count = [0]

    @mutator
    class _Dot(PyExprMutator):
        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            pad = _plain_conv(call) if is_op(call, "relax.nn.conv2d") else None
            if pad is None:
                return call
            count[0] += 1
            x, w = call.args
            bb = self.builder_
            n_out = int(w.ty.shape[3])
            packed = bb.emit(bb.call_te(partial(_pack_te, kind=kind), w,
                                        primfunc_name_hint="dot_pack"))
            offset = (bb.emit(bb.call_te(partial(_offset_te, kind=kind), w,
                                         primfunc_name_hint="dot_offset"))
                      if kind.shift else None)
            conv = partial(_conv_te, pad=pad, n_out=n_out, kind=kind)
            args = (x, packed) if offset is None else (x, packed, offset)
            return bb.call_te(conv, *args, primfunc_name_hint=f"{kind.name}_conv2d")

    mutator_ = _Dot(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator_.builder_.update_func(gv, mutator_.visit_expr(func))
    return relax.transform.DeadCodeElimination()(mutator_.builder_.get()), count[0]


# ---------------------------------------------------------------- the schedule


def kernel_kind(func: Any) -> DotKind | None:
    """The dot-product kind of a (fused) PrimFunc holding a convolution of
    :func:`use_int8_dot`, else None."""
    tvm = import_tvm_compiler()
    from tvm import s_tir

    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    for kind in KINDS.values():
        try:
            sch.get_sblock(kind.conv_block)
        except (s_tir.schedule.ScheduleError, ValueError, RuntimeError):
            continue
        return kind
    return None


def tensorized_schedule(task_mod: Any) -> Any:
    """The schedule of a tuning task's module (one PrimFunc) if it is a dot-product
    convolution: it needs no tuning and always wins over a tuned or default record."""
    tvm = import_tvm_compiler()
    from tvm import s_tir

    func = next(iter(task_mod.functions.values()))
    kind = kernel_kind(func)
    if kind is None:
        return None
    return schedule(s_tir.Schedule(tvm.IRModule({"main": func})), kind)


def _divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def schedule(sch: Any, kind: DotKind) -> Any:
    """Schedule a fused PrimFunc holding a ``kind`` convolution, deterministically.

    The convolution keeps a ``wi x obi`` tile of ``kind.lanes``-wide int32 accumulators (at
    most ``kind.accumulators`` registers) over the whole reduction, with the dot-product
    instruction innermost; output rows are split across threads. The element-wise epilogue
    (offset, rescale, bias, ReLU, the next layer's quantization) is computed at each tile from
    its accumulators; the padding block runs as a parallel, vectorized loop of its own.
    """
    name = intrin(kind)
    out = _schedule_elementwise(sch, kind)
    conv = sch.get_sblock(kind.conv_block)
    n, h, w, ob, oi, r, s, cb, *inner = sch.get_loops(conv)  # inner: (group,) byte
    ow, nob = (int(sch.get(loop).extent) for loop in (w, ob))
    wi_n = _divisor(ow, 6)
    obi_n = _divisor(nob, max(1, kind.accumulators // wi_n))
    wo, wi = sch.split(w, [None, wi_n])
    obo, obi = sch.split(ob, [None, obi_n])
    sch.reorder(n, h, wo, obo, r, s, cb, wi, obi, oi, *inner)
    sch.parallel(sch.fuse(n, h, wo))
    acc = sch.cache_write(conv, 0, "global")
    sch.reverse_compute_at(acc, obo)
    sch.reverse_compute_at(out, obo)
    sch.compute_inline(acc)  # the epilogue reads the tile's accumulators
    sch.vectorize(sch.get_loops(out)[-1])
    init = sch.decompose_reduction(conv, r)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.unroll(wi)
    sch.unroll(obi)
    sch.tensorize(oi, name)
    return sch


def _schedule_elementwise(sch: Any, kind: DotKind) -> Any:
    """Inline the element-wise blocks after the convolution into the last one (returned:
    :func:`schedule` computes it per tile, from the accumulators); run the padding block as
    a parallel, vectorized loop."""
    from tvm.s_tir.schedule import ScheduleError

    root = sch.get_sblock("root")
    out = None
    for name in [sch.get(b).name_hint for b in sch.get_child_blocks(root)]:
        if name == kind.conv_block:
            continue
        if name == kind.pad_block:
            parallel_vectorized(sch, sch.get_sblock(name))
            continue
        try:
            sch.compute_inline(sch.get_sblock(name))
        except ScheduleError:
            out = sch.get_sblock(name)  # the output block
    return out
