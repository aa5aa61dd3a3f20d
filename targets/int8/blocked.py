"""Keep int8 activations in the blocked layout between blocked convolutions (graph surgery only).

After `relax.lower_qdq` with a dot-product layout, every blocked conv reads its input
through `layout_transform(x, NCHW -> NCHW4c)` and hands its requantized u8 output back
through `unblock` (NCHW16c -> NCHW: permute_dims, reshape, strided_slice); the residual
adds, relus, quantize / dequantize pairs and poolings between convs run in NCHW. This pass
walks the dataflow block once, in order, and for every value that `unblock` produced
remembers its blocked twin (N, C/16, H, W, 16). Then:

- an elementwise op whose tensor operands all have blocked twins of one shape, and whose
  other operands are scalar constants (quantize / dequantize with per-tensor scale, relu,
  clip, add, multiply, ...), is emitted on the twins too: the padded channels carry
  finite filler values that the next conv multiplies by zero weights and `unblock` drops;
- max_pool2d / avg_pool2d run in NCHW16c;
- an op that needs NCHW reads a value with a twin through one `unblock` of the twin, made
  there (not through the NCHW chain of elementwise ops that led to it);
- `layout_transform(x, NCHW -> NCHW{r}c)` of a value with a blocked twin becomes a
  re-blocking of the twin, 16c -> {r}c (reshape / permute / reshape of u8 in cache; for AMX's
  64c, four 16c blocks side by side), so no NCHW tensor is made between two blocked convs.

Every original binding is emitted too; DeadCodeElimination then drops the NCHW values no
one reads. What stays: one NCHW -> blocked change at the first conv, one blocked -> NCHW
change where a non-elementwise op (the classifier's mean / matmul) or the graph output
needs NCHW, and one u8 re-blocking per conv that follows a conv.
"""
from __future__ import annotations

from dataclasses import dataclass

ELEMENTWISE = {"relax.quantize", "relax.dequantize", "relax.nn.relu", "relax.clip", "relax.astype",
               "relax.add", "relax.subtract", "relax.multiply", "relax.maximum", "relax.minimum"}
POOLS = {"relax.nn.max_pool2d", "relax.nn.avg_pool2d"}
UNBLOCK_AXES = [0, 1, 4, 2, 3]


@dataclass(frozen=True)
class Twin:
    blocked: object   # the (N, C/lanes, H, W, lanes) expression
    lanes: int


def keep_blocked(mod):
    """(module with blocked activations between blocked convs, number of re-blockings)."""
    from tvm import relax

    reblocks = 0
    updated = {}
    for gvar, func in mod.functions.items():
        if not isinstance(func, relax.Function):
            continue
        new_func, count = _rewrite(func, gvar.name_hint)
        if new_func is not None:
            updated[gvar], reblocks = new_func, reblocks + count
    if not updated:
        return mod, 0
    mod = mod.clone()
    for gvar, func in updated.items():
        mod[gvar] = func
    return relax.transform.DeadCodeElimination()(mod), reblocks


def _rewrite(func, name: str):
    import tvm
    from tvm import relax

    from .layout import unblock

    body = func.body
    if not isinstance(body, relax.SeqExpr) or len(body.blocks) != 1 \
            or not isinstance(body.blocks[0], relax.DataflowBlock):
        return None, 0
    bindings = body.blocks[0].bindings
    if not all(isinstance(b, relax.VarBinding) for b in bindings):
        return None, 0
    values = {b.var: b.value for b in bindings}
    new_of: dict = {}        # original var -> its re-emitted var
    twins: dict = {}         # original var -> Twin (blocked version of its value)
    unblocks: set = set()    # original vars whose value is an unblock of their twin
    unblocked: dict = {}     # original var -> its NCHW value made from the twin, where one was needed
    reblocks = 0

    def sub(expr):
        if isinstance(expr, relax.Var):
            if expr in twins and expr not in unblocks:  # NCHW from the twin: one layout change, not a chain
                if expr not in unblocked:
                    twin, shape = twins[expr], _shape(expr)
                    padded = _shape(twin.blocked)[1] * twin.lanes
                    unblocked[expr] = builder.emit(unblock(twin.blocked, shape, padded))
                return unblocked[expr]
            return new_of.get(expr, expr)
        if isinstance(expr, relax.Tuple):
            return relax.Tuple([sub(f) for f in expr.fields])
        if isinstance(expr, relax.TupleGetItem):
            return relax.TupleGetItem(sub(expr.tuple_value), expr.index)
        if isinstance(expr, relax.Call):
            return relax.Call(expr.op, [sub(a) for a in expr.args], expr.attrs, expr.ty_args)
        return expr

    builder = relax.BlockBuilder()
    with builder.function(name, params=list(func.params), attrs=dict(func.attrs or {}), pure=func.is_pure):
        with builder.dataflow():
            for binding in bindings:
                var, value = binding.var, binding.value
                twin, replacement = None, None
                if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op):
                    op = value.op.name
                    twin = _unblocked_from(value, values, new_of)
                    if twin is not None:
                        unblocks.add(var)
                    if twin is None and op in ELEMENTWISE:
                        twin = _elementwise(value, twins, builder)
                    elif twin is None and op in POOLS:
                        twin = _pool(value, twins, builder)
                    elif op == "relax.layout_transform" and value.args[0] in twins:
                        replacement = _reblock(value, twins[value.args[0]], builder)
                        if replacement is not None:
                            reblocks += 1
                emit = builder.emit if isinstance(var, relax.DataflowVar) else builder.emit_output
                new_of[var] = emit(replacement if replacement is not None else sub(value), str(var.name))
                if twin is not None:
                    twins[var] = twin
            output = _outputs(body.body, new_of)
        builder.emit_func_output(output)
    return builder.get()[name], reblocks


def _outputs(expr, new_of):
    """The function's result with its vars renamed (never through a dataflow-only unblock)."""
    from tvm import relax

    if isinstance(expr, relax.Var):
        return new_of.get(expr, expr)
    if isinstance(expr, relax.Tuple):
        return relax.Tuple([_outputs(f, new_of) for f in expr.fields])
    return expr


def _shape(expr) -> list[int] | None:
    info = getattr(expr, "ty", None) or getattr(expr, "struct_info", None)
    shape = getattr(info, "shape", None)
    values = getattr(shape, "values", None)
    if values is None:
        return None
    try:
        return [int(v) for v in values]
    except TypeError:
        return None


def _unblocked_from(value, values, new_of) -> Twin | None:
    """`value` is reshape(permute_dims(X, [0,1,4,2,3])) (or a channel slice of one): X's twin."""
    from tvm import relax

    op = value.op.name
    if op == "relax.strided_slice":
        source = value.args[0]
        axes = [int(a) for a in value.attrs.axes] if hasattr(value.attrs, "axes") else None
        if axes is None and len(value.args) > 1:  # 0.27 passes axes/begin/end as arguments
            axes = [int(a.value) for a in value.args[1].fields] if isinstance(value.args[1], relax.Tuple) else None
        if axes != [1] or source not in values:
            return None
        value = values[source]
        op = value.op.name if isinstance(value, relax.Call) else ""
    if op != "relax.reshape" or value.args[0] not in values:
        return None
    permuted = values[value.args[0]]
    if not (isinstance(permuted, relax.Call) and permuted.op.name == "relax.permute_dims"):
        return None
    axes = [int(a) for a in permuted.attrs.axes] if permuted.attrs.axes is not None else None
    blocked = permuted.args[0]
    shape = _shape(blocked)
    if axes != UNBLOCK_AXES or shape is None or len(shape) != 5:
        return None
    return Twin(new_of.get(blocked, blocked), shape[4])


def _scalar_const(expr) -> bool:
    import tvm

    if not isinstance(expr, tvm.ir.Constant):
        return False
    value = expr.value  # a tensor for relax constants; a plain number for a scalar (clip's bounds, T.int64(0))
    return int(value.numpy().size) == 1 if hasattr(value, "numpy") else True


def _elementwise(call, twins, builder) -> Twin | None:
    import tvm
    from tvm import relax

    args, lanes, shape = [], None, None
    for arg in call.args:
        if isinstance(arg, relax.Var) and arg in twins:
            twin = twins[arg]
            twin_shape = _shape(twin.blocked)
            if shape is not None and (twin_shape != shape or twin.lanes != lanes):
                return None
            shape, lanes = twin_shape, twin.lanes
            args.append(twin.blocked)
        elif _scalar_const(arg) or not isinstance(arg, (relax.Var, relax.Call, relax.Tuple, tvm.ir.Constant)):
            args.append(arg)
        else:
            return None
    if shape is None:
        return None
    blocked = builder.emit(relax.Call(call.op, args, call.attrs, call.ty_args))
    return Twin(blocked, lanes)


def _pool(call, twins, builder) -> Twin | None:
    from tvm import relax

    data = call.args[0]
    attrs = call.attrs
    if data not in twins or str(attrs.layout) != "NCHW" or str(attrs.out_layout) != "NCHW":
        return None
    twin = twins[data]
    layout = f"NCHW{twin.lanes}c"
    make = relax.op.nn.max_pool2d if call.op.name == "relax.nn.max_pool2d" else relax.op.nn.avg_pool2d
    blocked = builder.emit(make(twin.blocked, pool_size=[int(v) for v in attrs.pool_size],
                                strides=[int(v) for v in attrs.strides], padding=[int(v) for v in attrs.padding],
                                dilation=[int(v) for v in attrs.dilation], ceil_mode=bool(attrs.ceil_mode),
                                count_include_pad=bool(attrs.count_include_pad), layout=layout, out_layout=layout))
    return Twin(blocked, twin.lanes)


def _reblock(call, twin: Twin, builder):
    """layout_transform(x, NCHW -> NCHW{r}c) as a re-blocking of x's NCHW{lanes}c twin (None: can't)."""
    from tvm import relax

    out = _shape(call)
    source = _shape(twin.blocked)
    if out is None or source is None or len(out) != 5:
        return None
    r = out[4]
    n, blocks, height, width, lanes = source
    if out[0] != n or out[2:4] != [height, width]:
        return None
    x = twin.blocked
    if r > lanes and r % lanes == 0:  # e.g. 16c -> 64c (AMX): groups of r / lanes blocks side by side
        group = r // lanes
        if blocks < out[1] * group:  # channels the conv pads to whole 64-blocks: any finite value meets zero weights
            x = builder.emit(relax.op.nn.pad(x, [0, 0, 0, out[1] * group - blocks, 0, 0, 0, 0, 0, 0]))
        x = builder.emit(relax.op.reshape(x, (n, out[1], group, height, width, lanes)))
        x = builder.emit(relax.op.permute_dims(x, [0, 1, 3, 4, 2, 5]))
        return builder.emit(relax.op.reshape(x, (n, out[1], height, width, r)))
    if lanes % r or out[1] > blocks * lanes // r:
        return None
    if r != lanes:
        x = builder.emit(relax.op.reshape(x, (n, blocks, height, width, lanes // r, r)))
        x = builder.emit(relax.op.permute_dims(x, [0, 1, 4, 2, 3, 5]))
        x = builder.emit(relax.op.reshape(x, (n, blocks * lanes // r, height, width, r)))
    if blocks * lanes // r != out[1]:  # more padded channels than the conv's kernel was padded to
        x = builder.emit(relax.op.strided_slice(x, axes=[1], begin=[0], end=[out[1]]))
    return x


def layout_changes(mod) -> dict[str, int]:
    """Count the layout-changing ops in a Relax module: into blocked, out of it, and re-blockings."""
    from tvm import relax

    counts = {"to_blocked": 0, "from_blocked": 0, "reblock": 0}
    for _, func in mod.functions.items():
        if not isinstance(func, relax.Function):
            continue
        text = func.script(show_meta=False)
        counts["to_blocked"] += text.count("R.layout_transform(")
        counts["from_blocked"] += text.count(f"axes={UNBLOCK_AXES}")
        counts["reblock"] += text.count("axes=[0, 1, 4, 2, 3, 5]") + text.count("axes=[0, 1, 3, 4, 2, 5]")
    return counts
