"""Relax passes for the real int8 convolutions, after :func:`frontend.relax_int8_rewrite`.

Why :func:`exact_rescale` exists (issue 11, "int8 --tune fails verification"): PyTorch's
fake-quant reference (``compress.quantize.QuantConv2d``) computes ``y = acc * scale`` and then
``y + bias`` as two float32 operations, each rounded. TVM's LLVM backend builds every module
with ``TargetOptions.AllowFPOpFusion = FPOpFusion::Fast`` (no target attribute turns it off), so
once a MetaSchedule schedule inlines the elementwise epilogue into one expression
``float(acc) * scale + bias``, LLVM contracts it into one FMA with a single rounding. The
untuned build keeps each block in its own loop with a store in between, so it has no FMA and
matched. The FMA differs from PyTorch in the last bit about 25 times per million outputs; after
``round(y / next_scale)`` a few of those become int8 codes off by one, and one such code in
image 652 of calib/ moved a logit by 0.63. The int32 accumulation itself was exact.

The fix computes the rescale as ``float32(float64(acc) * float64(scale))``: for ``|acc| < 2**24``
the float64 product is exact, so its one rounding to float32 equals PyTorch's float32 multiply
bit for bit, and the add that follows takes an ``fptrunc``, not an ``fmul``: there is nothing
for LLVM to contract, whatever the schedule. The extra float64 work is one multiply per conv
output, negligible next to the convolution.
"""

from __future__ import annotations

from typing import Any

from lprnet_edge.compiler.errors import import_tvm_compiler


def _is_op(e: Any, name: str) -> bool:
    import tvm
    from tvm import relax

    return isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == name


def _dtype(e: Any) -> str | None:
    """The element type of a Relax tensor expression (None if not a tensor)."""
    dtype = getattr(getattr(e, "ty", None), "dtype", None)
    return None if dtype is None else str(dtype)


def _is_int8_conv(e: Any) -> bool:
    """``R.nn.conv2d(int8, int8, out_dtype="int32")``, the rewrite's integer convolution."""
    if not _is_op(e, "relax.nn.conv2d") or str(e.attrs.out_dtype) != "int32":
        return False
    return all(_dtype(a) == "int8" for a in e.args)


def exact_rescale(mod: Any) -> tuple[Any, int]:
    """Rewrite ``multiply(astype(int8_conv, float32), scale)`` (either operand order) into
    ``astype(multiply(astype(int8_conv, float64), astype(scale, float64)), float32)``: the
    same float32 values as PyTorch, immune to FMA contraction (see the module docstring).
    Returns the new module and the number of multiplies rewritten."""
    tvm = import_tvm_compiler()
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    count = [0]

    @mutator
    class _ExactRescale(PyExprMutator):
        def _value(self, e: Any) -> Any:
            if isinstance(e, relax.Var):
                b = self.lookup_binding(e)
                if b is not None:
                    return b
            return e

        def _int8_acc(self, e: Any) -> Any:
            """The int32 conv behind ``astype(conv, float32)``, else None."""
            v = self._value(e)
            if not (_is_op(v, "relax.astype") and str(v.attrs.dtype) == "float32"):
                return None
            conv = v.args[0]
            return conv if _is_int8_conv(self._value(conv)) else None

        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if not _is_op(call, "relax.multiply"):
                return call
            a, b = call.args
            acc, scale = self._int8_acc(a), b
            if acc is None:
                acc, scale = self._int8_acc(b), a
            if acc is None or _dtype(scale) != "float32":
                return call
            count[0] += 1
            prod = relax.op.multiply(relax.op.astype(acc, "float64"),
                                     relax.op.astype(scale, "float64"))
            return relax.op.astype(prod, "float32")

    out = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            out[gv] = _ExactRescale().visit_expr(func)
    # the old float32 astype is left unused: drop it, or it would stay a kernel of its own
    seq = tvm.transform.Sequential([relax.transform.CanonicalizeBindings(),
                                    relax.transform.DeadCodeElimination()])
    return seq(out), count[0]


# ---------------------------------------------------------------- integer dot products (VNNI)
#
# Why a rewrite and a hand-written schedule (issue 11, "int8 faster than fp32"): an int8 conv
# lowered by ``R.nn.conv2d`` multiplies widened int32 lanes, 16 per AVX-512 instruction, the
# same count as fp32 FMAs; only ``vpdpbusd`` (AVX512-VNNI: 64 u8 x s8 products summed into 16
# int32 lanes) makes int8 cheaper. Using it needs the weights packed as
# ``[O/16, KH, KW, C/4, 16, 4]`` and the activations unsigned, so each int8 convolution is
# replaced by a TE computation on those operands, scheduled by :func:`schedule_vnni` and
# tensorized with :data:`VNNI_INTRIN`. Signed int8 activations ``a`` become ``a + 128`` (u8,
# padding too) and ``128 * sum(w)`` is subtracted per output channel: exact in int32, so the
# result equals ``R.nn.conv2d`` bit for bit. Weight packing and that sum depend on the
# weights only and are computed at build time (:func:`precompute_params`).
#
# TVM 0.27's own ``VNNI_DOT_16x4_INTRIN`` passes ``<16 x i32>`` operands to
# ``llvm.x86.avx512.vpdpbusd.512``, which the bundled LLVM declares with ``<64 x i8>`` ones
# ("Call parameter type does not match function signature"): :data:`VNNI_INTRIN` is the same
# description with the operands reinterpreted as bytes.

VNNI_INTRIN = "lprnet_edge_vnni_dot_16x4_u8i8i32"
VNNI_CONV_BLOCK = "vnni_conv"
VNNI_PAD_BLOCK = "vnni_pad"
_registered: list[bool] = []


def register_vnni_intrin() -> str:
    """Register :data:`VNNI_INTRIN` once per process (schedules and trace replay need it)."""
    if _registered:
        return VNNI_INTRIN
    import_tvm_compiler()
    from tvm.s_tir import TensorIntrin
    from tvm.s_tir.tensor_intrin.x86 import dot_product_16x4_u8i8i32_desc
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def vnni_impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), "uint8", offset_factor=1)
        B = T.match_buffer(b, (16, 4), "int8", offset_factor=1)
        C = T.match_buffer(c, (16,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            a_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
            a_u8 = T.reinterpret(T.broadcast(a_i32, 16), dtype="int8x64")
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                C.vload([0], dtype="int32x16"), a_u8, B.vload([0, 0], dtype="int8x64"),
                dtype="int32x16")

    TensorIntrin.register(VNNI_INTRIN, dot_product_16x4_u8i8i32_desc, vnni_impl, override=True)
    _registered.append(True)
    return VNNI_INTRIN


def int8_dot(target: Any) -> str | None:
    """The integer dot-product instruction set the int8 convolutions can use on ``target``
    (a ``tvm.target.Target``), or None. Read from the target's ``mattr``, never assumed:
    build hosts differ from day to day (some are AVX2-only)."""
    attrs = target.attrs if hasattr(target, "attrs") else {}
    mattr = {str(m) for m in attrs.get("mattr", [])} if "mattr" in attrs else set()
    if str(target.kind.name) == "llvm" and {"+avx512vnni", "+avx512bw"} <= mattr:
        return "vnni"
    return None


def _ceil(n: int, m: int) -> int:
    return -(-n // m) * m


def _vnni_pack_te(w: Any) -> Any:
    """HWIO int8 weights -> ``[O/16, KH, KW, C/4, 16, 4]`` (zero-padded to whole blocks)."""
    from tvm import te, tirx

    kh_, kw_, c_, o_ = (int(d) for d in w.shape)
    return te.compute(
        (_ceil(o_, 16) // 16, kh_, kw_, _ceil(c_, 4) // 4, 16, 4),
        lambda ob, r, s, cb, oi, ci: tirx.if_then_else(
            tirx.all(ob * 16 + oi < o_, cb * 4 + ci < c_),
            w[r, s, tirx.min(cb * 4 + ci, c_ - 1), tirx.min(ob * 16 + oi, o_ - 1)],
            tirx.const(0, "int8")), name="vnni_pack")


def _vnni_offset_te(w: Any) -> Any:
    """``128 * sum(w)`` per output channel: what the +128 shift of the activations adds."""
    from tvm import te

    kh_, kw_, c_, o_ = (int(d) for d in w.shape)
    r = te.reduce_axis((0, kh_), "r")
    s = te.reduce_axis((0, kw_), "s")
    c = te.reduce_axis((0, c_), "c")
    total = te.compute((o_,), lambda o: te.sum(w[r, s, c, o].astype("int32"), axis=[r, s, c]),
                       name="vnni_wsum")
    return te.compute((o_,), lambda o: total[o] * 128, name="vnni_offset")


def _vnni_conv_te(x: Any, packed: Any, offset: Any, pad: tuple[int, int, int, int]) -> Any:
    """``conv2d(x, w)`` (int8 NHWC, stride 1, int32 out) from :func:`_vnni_pack_te` and
    :func:`_vnni_offset_te` of ``w``: u8 x s8 products (see the section comment)."""
    from tvm import te, tirx

    n_, h_, w_, c_ = (int(d) for d in x.shape)
    ob_, kh_, kw_, cb_ = (int(d) for d in packed.shape[:4])
    o_ = int(offset.shape[0])
    top, left, bottom, right = pad
    hp, wp = h_ + top + bottom, w_ + left + right

    def shifted(n: Any, h: Any, ww: Any, c: Any) -> Any:
        inside = tirx.all(h >= top, h < h_ + top, ww >= left, ww < w_ + left, c < c_)
        val = x[n, tirx.max(tirx.min(h - top, h_ - 1), 0),
                tirx.max(tirx.min(ww - left, w_ - 1), 0), tirx.min(c, c_ - 1)]
        shifted = (val.astype("int32") + 128).astype("uint8")
        return tirx.if_then_else(inside, shifted, tirx.const(128, "uint8"))

    xu = te.compute((n_, hp, wp, cb_ * 4), shifted, name=VNNI_PAD_BLOCK)
    r = te.reduce_axis((0, kh_), "r")
    s = te.reduce_axis((0, kw_), "s")
    cb = te.reduce_axis((0, cb_), "cb")
    ci = te.reduce_axis((0, 4), "ci")
    conv = te.compute(
        (n_, hp - kh_ + 1, wp - kw_ + 1, ob_, 16),
        lambda n, h, ww, ob, oi: te.sum(
            xu[n, h + r, ww + s, cb * 4 + ci].astype("int32")
            * packed[ob, r, s, cb, oi, ci].astype("int32"), axis=[r, s, cb, ci]),
        name=VNNI_CONV_BLOCK)
    return te.compute((n_, hp - kh_ + 1, wp - kw_ + 1, o_),
                      lambda n, h, ww, o: conv[n, h, ww, o // 16, o % 16] - offset[o],
                      name="vnni_out")


def _plain_conv(call: Any) -> tuple[int, int, int, int] | None:
    """The padding of an int8 NHWC/HWIO convolution the VNNI form covers (stride 1, no
    dilation, one group), else None."""
    a = call.attrs
    if not _is_int8_conv(call) or str(a.data_layout) != "NHWC" or str(a.kernel_layout) != "HWIO":
        return None
    if any(int(v) != 1 for v in [*a.strides, *a.dilation]) or int(a.groups) != 1:
        return None
    top, left, bottom, right = (int(v) for v in a.padding)
    return top, left, bottom, right


def use_vnni(mod: Any) -> tuple[Any, int]:
    """Replace each int8 NHWC convolution of ``mod`` by its VNNI form (three ``call_te``:
    weight packing and offset, which depend on the weights only, and the convolution).
    Returns the new module and the number of convolutions replaced."""
    tvm = import_tvm_compiler()
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    count = [0]

    @mutator
    class _Vnni(PyExprMutator):
        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            pad = _plain_conv(call) if _is_op(call, "relax.nn.conv2d") else None
            if pad is None:
                return call
            count[0] += 1
            x, w = call.args
            bb = self.builder_
            packed = bb.emit(bb.call_te(_vnni_pack_te, w, primfunc_name_hint="vnni_pack"))
            offset = bb.emit(bb.call_te(_vnni_offset_te, w, primfunc_name_hint="vnni_offset"))
            return bb.call_te(_vnni_conv_te, x, packed, offset, pad,
                              primfunc_name_hint="vnni_conv2d")

    mutator_ = _Vnni(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator_.builder_.update_func(gv, mutator_.visit_expr(func))
    out = mutator_.builder_.get()
    return relax.transform.DeadCodeElimination()(out), count[0]


def precompute_params(mod: Any, params: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Compute everything of ``main`` that depends on the weights only, once, here.

    The int8 graph quantizes its float weights (divide, round, clip, cast), lays them out
    and, in the VNNI form, packs them and sums them: per inference that is several passes
    over every weight. ``LiftTransformParams`` moves those computations into a function of
    the weights alone, which is compiled for this host and run once; ``main`` then takes
    its results (int8, int32 or float arrays) as its parameters, stored as they are.
    """
    tvm = import_tvm_compiler()
    import numpy as np
    from tvm import relax

    lifted = relax.transform.LiftTransformParams()(mod)
    name = "main_transform_params"
    if name not in [gv.name_hint for gv in lifted.functions.keys()]:
        return mod, params
    only = relax.transform.DeadCodeElimination([name])(lifted)
    only = tvm.IRModule({gv: f for gv, f in only.functions_items() if gv.name_hint != "main"})
    with tvm.transform.PassContext(opt_level=3):
        ex = tvm.compile(only, tvm.target.Target("llvm"))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    old = [v.name for v in mod["main"].params[1:]]
    results = vm[name]([tvm.runtime.tensor(np.ascontiguousarray(params[n])) for n in old])
    main = lifted["main"]
    new_params: dict[str, Any] = {}
    new_vars = [main.params[0]]
    for i, (var, value) in enumerate(zip(main.params[1:], results, strict=True)):
        key = var.name if var.name in params else f"t{i}_{var.name}"
        new_params[key] = value.numpy()
        new_vars.append(relax.Var(key, var.ty))
    body = _rename_vars(main.body, dict(zip(main.params, new_vars, strict=True)))
    out = tvm.IRModule({gv: f for gv, f in lifted.functions_items() if gv.name_hint != name},
                       attrs=lifted.attrs)
    out["main"] = relax.Function(new_vars, body, main.ret_ty, main.is_pure, main.attrs)
    return relax.transform.DeadCodeElimination(["main"])(out), new_params


def _rename_vars(expr: Any, mapping: dict[Any, Any]) -> Any:
    """``expr`` with the variables of ``mapping`` replaced."""
    from tvm.relax.expr_functor import PyExprMutator, mutator

    @mutator
    class _Rename(PyExprMutator):
        def visit_var_(self, var: Any) -> Any:
            return next((new for old, new in mapping.items() if old.same_as(var)), var)

    return _Rename().visit_expr(expr)


def is_vnni_kernel(func: Any) -> bool:
    """Whether a (fused) PrimFunc computes a VNNI convolution of :func:`use_vnni`."""
    tvm = import_tvm_compiler()
    from tvm import s_tir

    try:
        s_tir.Schedule(tvm.IRModule({"main": func})).get_sblock(VNNI_CONV_BLOCK)
    except (s_tir.schedule.ScheduleError, ValueError, RuntimeError):
        return False
    return True


def tensorized_schedule(task_mod: Any) -> Any:
    """The schedule of a tuning task's module (one PrimFunc) if it is a VNNI convolution:
    it needs no tuning and always wins over a tuned or default record. Else None."""
    tvm = import_tvm_compiler()
    from tvm import s_tir

    func = next(iter(task_mod.functions.values()))
    if not is_vnni_kernel(func):
        return None
    return schedule_vnni(s_tir.Schedule(tvm.IRModule({"main": func})))


def _divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def schedule_vnni(sch: Any) -> Any:
    """Schedule a fused PrimFunc holding a VNNI convolution (``sch``: an
    ``s_tir.Schedule`` of it), deterministically, no tuning needed.

    The convolution keeps a ``wi x obi`` tile of 16-lane int32 accumulators (up to 24 of the
    32 zmm registers) over the whole reduction, with ``vpdpbusd`` innermost
    (:data:`VNNI_INTRIN`); output rows are split across threads. The padding/shift block and
    the element-wise epilogue (offset, rescale, bias, ReLU, the next layer's quantization)
    run as parallel, vectorized loops of their own.
    """
    register_vnni_intrin()
    _schedule_elementwise(sch)
    conv = sch.get_sblock(VNNI_CONV_BLOCK)
    n, h, w, ob, oi, r, s, cb, ci = sch.get_loops(conv)
    ow, nob = (int(sch.get(loop).extent) for loop in (w, ob))
    wi_n = _divisor(ow, 6)
    obi_n = _divisor(nob, max(1, 24 // wi_n))
    wo, wi = sch.split(w, [None, wi_n])
    obo, obi = sch.split(ob, [None, obi_n])
    sch.reorder(n, h, wo, obo, r, s, cb, wi, obi, oi, ci)
    sch.parallel(sch.fuse(n, h, wo))
    acc = sch.cache_write(conv, 0, "global")
    sch.reverse_compute_at(acc, obo)
    init = sch.decompose_reduction(conv, r)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(acc)[-1])
    sch.unroll(wi)
    sch.unroll(obi)
    sch.tensorize(oi, VNNI_INTRIN)
    return sch


def _schedule_elementwise(sch: Any) -> None:
    """Inline the element-wise blocks around the convolution into the last one; run that
    and the padding block as parallel, vectorized loops."""
    from tvm.s_tir.schedule import ScheduleError

    root = sch.get_sblock("root")
    names = [sch.get(b).name_hint for b in sch.get_child_blocks(root)]
    kept = []
    for name in names:
        if name in (VNNI_CONV_BLOCK, VNNI_PAD_BLOCK):
            kept.append(name) if name == VNNI_PAD_BLOCK else None
            continue
        try:
            sch.compute_inline(sch.get_sblock(name))
        except ScheduleError:
            kept.append(name)  # an output block
    for name in kept:
        _parallel_vectorized(sch, sch.get_sblock(name))


def _parallel_vectorized(sch: Any, block: Any) -> None:
    """An element-wise block as one parallel loop over all but its innermost axis, which is
    vectorized."""
    loops = sch.get_loops(block)
    if len(loops) < 2:
        return
    sch.parallel(sch.fuse(*loops[:-1]))
    sch.vectorize(loops[-1])


_ELEMENTWISE = ("relax.clip", "relax.astype", "relax.round")


def cancel_transposes(mod: Any) -> tuple[Any, int]:
    """Rewrite ``permute_dims(f(permute_dims(x, a)), b)`` into ``f(x)`` when ``b`` undoes
    ``a`` and ``f`` is a chain of element-wise ops (clip, astype, round).

    ``ConvertLayout`` does not know ``clip``, so each int8 convolution's input quantization
    is wrapped in an NHWC -> NCHW -> NHWC round trip: two transposes per layer, 40% of the
    int8 model's time before this pass. Returns the module and the number removed."""
    tvm = import_tvm_compiler()
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    count = [0]

    def axes(e: Any) -> list[int] | None:
        a = e.attrs.axes
        return None if a is None else [int(v) for v in a]

    @mutator
    class _Cancel(PyExprMutator):
        def _value(self, e: Any) -> Any:
            b = self.lookup_binding(e) if isinstance(e, relax.Var) else None
            return e if b is None else b

        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if not _is_op(call, "relax.permute_dims") or axes(call) is None:
                return call
            chain, e = [], self._value(call.args[0])
            while any(_is_op(e, op) for op in _ELEMENTWISE):
                chain.append(e)
                e = self._value(e.args[0])
            if not chain or not _is_op(e, "relax.permute_dims") or axes(e) is None:
                return call
            outer, inner = axes(call), axes(e)
            if [inner[i] for i in outer] != list(range(len(outer))):
                return call
            count[0] += 1
            out = e.args[0]
            for op in reversed(chain):
                out = relax.Call(op.op, [out, *op.args[1:]], op.attrs)
            return out

    out = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            out[gv] = _Cancel().visit_expr(func)
    seq = tvm.transform.Sequential([relax.transform.CanonicalizeBindings(),
                                    relax.transform.DeadCodeElimination()])
    return seq(out), count[0]
