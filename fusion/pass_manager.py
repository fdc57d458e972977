"""The fusion pass: an Inductor post-grad custom pass that rewrites "norm/activation -> fp4op.quantize"
chains into the fused fp4op ops, with torch._inductor.pattern_matcher rules.

How it works:

* Each rule is a `FusionPattern` (fusion/rms_norm.py, layer_norm.py, activation.py): a `pattern`
  function written the way models write the computation, followed by ``fp4op.quantize``, and a
  `replacement` that calls the fused op. Both are traced the way Inductor traces its own rules
  (`fwd_only`: functionalized and decomposed), so the pattern looks like the post-grad graph.
* The quantize arguments (recipe, layout, inversed global scale, global scale or None) are baked into a
  traced pattern. Rather than tracing every combination up front, the pass registers the rules for a
  (quantize arguments, device type) pair the first time a graph with such a quantize reaches it; each
  pair is registered once per pass object.
* Scalars the rules capture (eps) are pattern parameters through `scalar_workaround`, so any value
  matches. The placeholder values are float32-exact (F.rms_norm's decomposition rounds eps to float32 on
  CPU; an exact placeholder survives that rounding and is recognized).
* A producer output read by several quantizes that cannot be merged (different global-scale tensors or
  flags) gets a private copy of its norm/activation per quantize before the rules run
  (`share_producers_by_copy`), so each quantize fuses with its own copy; copies that did not fuse are
  folded back into their originals afterwards (`undo_unfused_copies`).
* Matches are counted per rule (`FusionPass.counts`, `fp4op.fusion.match_counts()`) and logged on the
  "fp4op.fusion" logger; the ops of each graph before and after the pass are kept (`FusionPass.records`).
* The pass is a CustomGraphPass with a uuid hashed from these sources, so Inductor's FX graph cache keys
  on it. On a cache hit Inductor does not run post-grad passes (the cached code is already fused), so the
  counters only move when a graph is actually compiled.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import inspect
import logging
import operator
import os
from typing import Any, Callable, Sequence

import sympy
import torch
from torch._dynamo.utils import counters
from torch._inductor import pattern_matcher as pm
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

log = logging.getLogger("fp4op.fusion")

QUANTIZE = torch.ops.fp4op.quantize.default
# the quantize arguments after `input`, with their schema defaults (None: no default)
_QUANTIZE_ARGS = (
    ("global_scale", None),
    ("sf_vec_size", 16),
    ("sf_use_ue8m0", False),
    ("is_sf_swizzled_layout", True),
    ("is_sf_8x4_layout", False),
    ("is_global_scale_inversed", False),
)
_MODEL_DTYPES = (torch.float16, torch.bfloat16)


@dataclasses.dataclass(frozen=True)
class QuantizeArgs:
    """The non-tensor arguments of one fp4op.quantize call, and whether it has a global scale."""

    sf_vec_size: int = 16
    sf_use_ue8m0: bool = False
    is_sf_swizzled_layout: bool = True
    is_sf_8x4_layout: bool = False
    is_global_scale_inversed: bool = False
    has_global_scale: bool = True

    @property
    def flags(self) -> tuple:
        return (
            self.sf_vec_size,
            self.sf_use_ue8m0,
            self.is_sf_swizzled_layout,
            self.is_sf_8x4_layout,
            self.is_global_scale_inversed,
        )

    def quantize(self, x: torch.Tensor, global_scale: torch.Tensor | None):
        """fp4op.quantize with these arguments (what the patterns are traced with)."""
        return torch.ops.fp4op.quantize(x, global_scale, *self.flags)

    def tail(self, global_scale: torch.Tensor | None) -> tuple:
        """The trailing `Q` arguments of every fused op."""
        return (global_scale, *self.flags)

    def label(self) -> str:
        recipe = "mxfp4" if self.sf_use_ue8m0 else "nvfp4" if self.sf_vec_size == 16 else f"vec{self.sf_vec_size}"
        layout = "linear" if not self.is_sf_swizzled_layout else "8x4" if self.is_sf_8x4_layout else "128x4"
        gs = ("inv-gs" if self.is_global_scale_inversed else "gs") if self.has_global_scale else "no-gs"
        return f"{recipe}/{layout}/{gs}"


# the last quantize argument, enable_pdl, is a launch option (results never depend on it): the fused
# kernels choose it themselves, so the rules match without it and it goes back on the quantizes that stay
_PDL_ARG = "enable_pdl"
_PDL_META = "fp4op_enable_pdl"


def _quantize_arg_values(node: torch.fx.Node) -> list:
    """The arguments of a quantize node after `input` up to enable_pdl, positional, defaults filled in."""
    values = list(node.args[1 : 1 + len(_QUANTIZE_ARGS)])
    for name, default in _QUANTIZE_ARGS[len(values):]:
        values.append(node.kwargs.get(name, default))
    return values


def _enable_pdl_of(node: torch.fx.Node):
    return node.args[1 + len(_QUANTIZE_ARGS)] if len(node.args) > 1 + len(_QUANTIZE_ARGS) else node.kwargs.get(_PDL_ARG)


def canonicalize_quantize(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    """Rewrite every fp4op.quantize node into the form make_fx records (positional arguments, trailing
    defaults dropped), which is what the traced patterns contain, with enable_pdl set aside in the node's
    meta (see restore_launch_options); returns the quantize nodes."""
    nodes = list(graph.find_nodes(op="call_function", target=QUANTIZE))
    for node in nodes:
        pdl = _enable_pdl_of(node)
        if pdl is not None:
            node.meta[_PDL_META] = pdl
        values = _quantize_arg_values(node)
        while len(values) > 1 and values[-1] == _QUANTIZE_ARGS[len(values) - 1][1] and type(values[-1]) is type(
            _QUANTIZE_ARGS[len(values) - 1][1]
        ):
            values.pop()
        node.args = (node.args[0], *values)
        node.kwargs = {}
    return nodes


def restore_launch_options(graph: torch.fx.Graph) -> None:
    """Give the quantize nodes left after the rewrites the enable_pdl that canonicalize_quantize set aside."""
    for node in graph.find_nodes(op="call_function", target=QUANTIZE):
        if _PDL_META in node.meta:
            # every argument positional: Inductor's lowering of the op wants no gap before a keyword
            node.args = (node.args[0], *_quantize_arg_values(node), node.meta[_PDL_META])
            node.kwargs = {}


# post-grad graphs hold a model's views as reshapes (Inductor's view_to_reshape)
_ROW_VIEWS = (torch.ops.aten.reshape.default, torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default)
# views that drop or add a size-1 dim, given by its index (diffusers' PixArt block squeezes its modulated
# norm output): the codes take the same op with the same index, as they have the same rank
_ROW_SQUEEZES = (torch.ops.aten.squeeze.dim, torch.ops.aten.squeeze.dims, torch.ops.aten.unsqueeze.default)


def quantize_before_row_views(graph: torch.fx.Graph, quantizes: list[torch.fx.Node]) -> int:
    """Quantize a tensor before a view that only regroups its rows, and view the codes instead; returns
    how many quantizes moved. ``quantize(h.view(-1, K))`` (a router or a projection reading the norm
    output flattened to tokens, as MoE blocks write it) gives the same bytes as ``quantize(h)`` with
    its codes viewed: the op quantizes rows of the last dim, in row order, and the scale factors
    depend only on the number of rows and K (a per-row global scale lists the same rows). The norm or
    activation then meets its quantize, and the rules see it. Only views that keep the last dim, and
    where K is static (the codes' view names K / 2)."""
    moved = 0
    for node in quantizes:
        view = node.args[0]
        if not (
            isinstance(view, torch.fx.Node)
            and view.target in (*_ROW_VIEWS, *_ROW_SQUEEZES)
            and isinstance(view.args[0], torch.fx.Node)
        ):
            continue
        source = view.args[0]
        source_val, view_val, out_val = source.meta.get("val"), view.meta.get("val"), node.meta.get("val")
        if not (isinstance(source_val, torch.Tensor) and isinstance(view_val, torch.Tensor) and isinstance(out_val, tuple)):
            continue
        k = source_val.shape[-1] if source_val.dim() > 0 else None
        if not isinstance(k, int) or view_val.dim() == 0 or view_val.shape[-1] != k or k % 2:
            continue
        codes = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0]
        if len(codes) > 1:
            continue
        codes_val = out_val[0]
        if view.target in _ROW_SQUEEZES:
            codes_target, codes_args = view.target, tuple(view.args[1:])
        else:
            codes_target, codes_args = torch.ops.aten.reshape.default, ([*view.args[1][:-1], k // 2],)
        node.replace_input_with(view, source)
        if not view.users:  # else the source keeps a reader besides the quantize, and cannot fuse
            graph.erase_node(view)
        node.meta["val"] = (codes_val.view(*source_val.shape[:-1], k // 2), *out_val[1:])
        if "eager_input_vals" in node.meta:  # the input layout Inductor keeps for the op: the source's
            args, kwargs = node.meta["eager_input_vals"]
            node.meta["eager_input_vals"] = ((source_val, *args[1:]), kwargs)
        if codes:
            getitem = codes[0]
            with graph.inserting_after(getitem):
                codes_view = graph.call_function(codes_target, (getitem, *codes_args))
            getitem.replace_all_uses_with(codes_view, delete_user_cb=lambda user: user is not codes_view)
            codes_view.meta = dict(getitem.meta)
            getitem.meta["val"] = node.meta["val"][0]
        moved += 1
    return moved


# the reductions among _COPYABLE_OPS (a producer cone holds no other)
_REDUCTIONS = frozenset(getattr(torch.ops.aten, name) for name in ("mean", "sum", "var_mean"))


def _first_val(node: torch.fx.Node) -> torch.Tensor | None:
    """A node's tensor value (the first of a multi-output op's)."""
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)) and val:
        val = val[0]
    return val if isinstance(val, torch.Tensor) else None


def _run_on_vals(node: torch.fx.Node) -> Any:
    """`node`'s op applied to its inputs' meta values (fake tensors): the value it computes."""
    args, kwargs = torch.fx.map_arg((node.args, node.kwargs), lambda n: n.meta["val"])
    return node.target(*args, **kwargs)


def _known_contiguous(val: torch.Tensor) -> bool:
    """Whether `val` is known to be contiguous (whatever its symbolic sizes)."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    expected = 1
    for size, stride in reversed(list(zip(val.shape, val.stride()))):
        if statically_known_true(size == 1):
            continue
        if not statically_known_true(stride == expected):
            return False
        expected = expected * size
    return True


def compute_sliced_rows_only(graph: torch.fx.Graph, quantizes: list[torch.fx.Node]) -> int:
    """Compute a norm/activation on the rows a quantize reads instead of on all of them, so that it
    meets its quantize: ``quantize(norm(x)[:, rows])`` becomes ``quantize(norm(x[:, rows]))``. Hugging
    Face's causal LMs write it so: the final norm's output sliced to the last token(s) before lm_head
    (``hidden_states[:, -logits_to_keep:, :]``; generate() keeps 1 at prefill). The same values: the
    producer's ops (those of a private copy, `private_producer_cone`) are elementwise, or reduce with
    keepdim over other dims than the sliced ones (the norms' statistics over the last dim), so each row's
    result depends on that row alone; its inputs are sliced where they have the sliced dims (a weight or
    a scalar has none), and a reduction over a sliced dim stays whole (it has no rows to slice). Only
    slices (one or a chain, each of its own dim) of dims before the last, of a producer output read by
    them alone. Returns how many quantizes now read their rows' own producer."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    moved = 0
    for node in quantizes:
        cuts = []  # the chain of slices from the quantize's input up to the producer, outermost first
        source = node.args[0]
        while (
            isinstance(source, torch.fx.Node) and source.target is torch.ops.aten.slice.Tensor and not source.kwargs
            and (not cuts or len(source.users) == 1)
        ):
            cuts.append(source)
            source = source.args[0]
        source_val = _first_val(source) if cuts and isinstance(source, torch.fx.Node) else None
        if source_val is None or len(source.users) != 1:
            continue
        rank = source_val.dim()
        # each cut as (its dim counted from the right, the source's size there, start, end, step), innermost first
        steps = []
        for cut in reversed(cuts):
            dim, start, end, step = (list(cut.args[1:]) + [0, None, None, 1][len(cut.args) - 1 :])[:4]
            from_right = rank - dim % rank if isinstance(dim, int) and rank else 0
            steps.append((from_right, source_val.shape[rank - from_right] if from_right else None, start, end, step))
        dims = [st[0] for st in steps]
        if min(dims) < 2 or len(set(dims)) != len(dims):  # the quantized (last) dim, or one dim sliced twice
            continue
        cone = private_producer_cone(source)

        def sliced_dims(n: Any) -> list[int] | None:
            """For each cut, where `n` has its dim (None: it has none, e.g. a weight, or a broadcast size 1);
            None if that is not known."""
            if not isinstance(n, torch.fx.Node) or isinstance(n.meta.get("val"), (int, float, torch.SymInt, torch.SymFloat)):
                return [None] * len(steps)  # a scalar
            val = _first_val(n)
            if val is None:
                return None
            where = []
            for from_right, size, *_ in steps:
                d = val.dim() - from_right
                if d < 0 or statically_known_true(val.shape[d] == 1) and not statically_known_true(size == 1):
                    where.append(None)
                elif statically_known_true(val.shape[d] == size):
                    where.append(d)
                else:
                    return None
            return where

        def row_local(member: torch.fx.Node) -> bool:
            """Whether `member` computes each kept row from that row alone, or is kept whole: an elementwise op,
            a reduction over other dims than the sliced ones (a norm's statistics over the last dim), or one
            over a sliced dim (its output has none: computed on all rows as before). The rank kept."""
            if getattr(member.target, "overloadpacket", None) not in _REDUCTIONS:
                return True
            in_val, out_val = _first_val(member.args[0]), _first_val(member)
            reduced = member.args[1] if len(member.args) > 1 else member.kwargs.get("dim")
            reduced = [reduced] if isinstance(reduced, int) else reduced
            if in_val is None or out_val is None or out_val.dim() != in_val.dim() or not reduced:
                return False
            if all(d is None for d in sliced_dims(member)):
                return True
            return not {r % in_val.dim() for r in reduced} & set(sliced_dims(member.args[0]))

        nodes = set(cone) | {a for m in cone for a in m.all_input_nodes}
        if not cone or any(sliced_dims(n) is None for n in nodes) or not all(row_local(m) for m in cone):
            continue

        env: dict[torch.fx.Node, torch.fx.Node] = {}
        outermost = cuts[0]

        def rows_of(n: Any) -> Any:
            """The kept rows of `n`: a copy of a cone member computed from its inputs' kept rows, a slice of
            an input, or `n` itself where it has no rows (a weight, a statistic over a sliced dim)."""
            if not isinstance(n, torch.fx.Node) or n in env:
                return env.get(n, n)
            where = sliced_dims(n)
            if all(d is None for d in where):
                return n
            if n in cone:
                args = torch.fx.map_arg((n.args, n.kwargs), rows_of)  # the inputs' rows first
                with graph.inserting_before(outermost):
                    rows = graph.create_node(n.op, n.target, *args)
                # the original's meta (Inductor's rounding barriers of emulate_precision_casts among it), with
                # the value the op gives on the rows: a new tensor, not a view of the unsliced one (the rules'
                # re-trace with these values must see the layouts the ops make)
                rows.meta = {**n.meta, "val": _run_on_vals(rows)}
                rows.meta.pop("tensor_meta", None)
                env[n] = rows
                return rows
            rows = n
            for d, (_, _, *args) in zip(where, steps):
                if d is not None:
                    with graph.inserting_before(outermost):
                        rows = graph.call_function(torch.ops.aten.slice.Tensor, (rows, d, *args))
                    rows.meta["val"] = _run_on_vals(rows)
            if not _known_contiguous(rows.meta["val"]):
                # the rows as a contiguous tensor, as the norms' decompositions make of a strided input (F.layer_norm
                # clones one), so the rules, which trace them with contiguous inputs, see the same graph
                with graph.inserting_before(outermost):
                    rows = graph.call_function(
                        torch.ops.aten.clone.default, (rows,), {"memory_format": torch.contiguous_format}
                    )
                rows.meta["val"] = _run_on_vals(rows)
            env[n] = rows
            return rows

        order = {n: i for i, n in enumerate(graph.nodes)}
        try:
            rows_of(source)
        except Exception:  # a value the fake execution cannot make: leave this quantize's graph as it was
            log.debug("fp4op.fusion: rows of %s not computed", source, exc_info=True)
            for created in reversed([n for n in graph.nodes if n not in order]):
                graph.erase_node(created)
            continue
        outermost.replace_all_uses_with(env[source])
        for n in cuts + sorted(cone, key=order.__getitem__, reverse=True):
            if not n.users:
                graph.erase_node(n)
        if "eager_input_vals" in node.meta:  # the input layout Inductor keeps for the op
            args, kwargs = node.meta["eager_input_vals"]
            node.meta["eager_input_vals"] = ((env[source].meta["val"], *args[1:]), kwargs)
        moved += 1
    return moved


def _is_conversion(node: Any) -> bool:
    return (
        isinstance(node, torch.fx.Node)
        and node.op == "call_function"
        and node.target is torch.ops.prims.convert_element_type.default
    )


def _conversion_key(node: torch.fx.Node) -> tuple:
    """What a dtype conversion computes: equal keys, equal values (the op is pure)."""
    return (node.args, tuple(sorted(node.kwargs.items())))


def merge_duplicate_quantizes(graph: torch.fx.Graph, quantizes: list[torch.fx.Node]) -> list[torch.fx.Node]:
    """Merge quantize calls with identical arguments (same input node, same global-scale node, same
    flags) into one: the op is pure, and a norm/activation output read by several layers (q/k/v or
    gate/up projections) otherwise has several users and cannot fuse. An input that is a dtype
    conversion counts by what it converts: layers that each cast one float32 norm output (FP4Linear
    under CUDA autocast, where LayerNorm runs in float32) read one tensor. Returns the remaining nodes."""
    first: dict[tuple, torch.fx.Node] = {}
    kept = []
    for node in quantizes:
        source = node.args[0]
        source_key = ("conversion", *_conversion_key(source)) if _is_conversion(source) else source
        key = (source_key, *node.args[1:])  # canonical: positional only
        if key in first:
            _move_getitems(node, first[key])
            graph.erase_node(node)
            if _is_conversion(source) and not source.users:  # a duplicate conversion read by this quantize only
                graph.erase_node(source)
        else:
            first[key] = node
            kept.append(node)
    return kept


def merge_duplicate_conversions(graph: torch.fx.Graph) -> int:
    """Merge dtype conversions of the same tensor to the same dtype into the first one; returns how many
    were merged. A model that converts a tensor twice (``x.float() * torch.rsqrt(x.float().pow(2).mean(...))``)
    has two identical conversion nodes in the post-grad graph (nothing merges them before the custom
    passes), and the norm patterns, written with one, do not match it. The op is pure."""
    first: dict[tuple, torch.fx.Node] = {}
    merged = 0
    # graph order: the first of a key comes before its duplicates
    for node in graph.find_nodes(op="call_function", target=torch.ops.prims.convert_element_type.default):
        key = _conversion_key(node)
        if key in first:
            node.replace_all_uses_with(first[key])
            graph.erase_node(node)
            merged += 1
        else:
            first[key] = node
    return merged


def canonicalize_variances(graph: torch.fx.Graph) -> int:
    """Write a variance's square the way the norm patterns are written; returns how many nodes changed:
    ``h * h`` read only by means (``(h * h).mean(-1)``, as gpt-fast and LitGPT write it) becomes
    ``pow(h, 2)``, which torch's kernels and Inductor compute as ``h * h`` (the same bits)."""
    changed = 0
    for node in list(graph.find_nodes(op="call_function", target=torch.ops.aten.mul.Tensor)):
        if len(node.args) != 2 or node.kwargs or node.args[0] is not node.args[1]:
            continue
        if not node.users or any(u.target is not torch.ops.aten.mean.dim for u in node.users):
            continue
        with graph.inserting_before(node):
            square = graph.call_function(torch.ops.aten.pow.Tensor_Scalar, (node.args[0], 2))
        square.meta = dict(node.meta)
        node.replace_all_uses_with(square)
        graph.erase_node(node)
        changed += 1
    return changed


def canonicalize_rsqrt_products(graph: torch.fx.Graph) -> int:
    """Write ``rsqrt(...) * h`` as the patterns do, ``h * rsqrt(...)``; returns how many products changed.
    A product of two tensors commutes bit for bit (IEEE multiplication, the same type promotion; only
    which NaN payload a NaN times a NaN carries may differ, which torch does not define)."""
    swapped = 0
    for node in graph.find_nodes(op="call_function", target=torch.ops.aten.mul.Tensor):
        if len(node.args) != 2 or node.kwargs:
            continue
        left, right = node.args
        if (
            isinstance(left, torch.fx.Node)
            and left.target is torch.ops.aten.rsqrt.default
            and isinstance(right, torch.fx.Node)
            and right.target is not torch.ops.aten.rsqrt.default
        ):
            node.args = (right, left)
            swapped += 1
    return swapped


def restore_zero_eps(graph: torch.fx.Graph) -> int:
    """Put back a norm's ``+ eps`` where eps is 0.0; returns how many. Inductor drops ``x + 0.0`` before
    the pass runs, so a norm written with eps 0 (``rsqrt(h.pow(2).mean(-1) + 0.0)``, ``F.layer_norm(...,
    eps=0.0)``) reaches it as ``rsqrt(mean)`` or ``rsqrt(var)``, which the patterns (traced with an eps)
    lack. Only where the rsqrt reads a mean of squares or var_mean's variance: those are +0 or more (or
    NaN), so adding 0.0 changes no value (it would turn a -0 into +0, and rsqrt(-0) is -inf)."""
    restored = 0
    for node in list(graph.find_nodes(op="call_function", target=torch.ops.aten.rsqrt.default)):
        arg = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if not isinstance(arg, torch.fx.Node):
            continue
        mean_of_squares = (
            arg.target is torch.ops.aten.mean.dim
            and isinstance(arg.args[0], torch.fx.Node)
            and arg.args[0].target is torch.ops.aten.pow.Tensor_Scalar
            and arg.args[0].args[1] == 2
        )
        variance = (
            arg.target is operator.getitem
            and arg.args[1] == 0
            and isinstance(arg.args[0], torch.fx.Node)
            and arg.args[0].target is torch.ops.aten.var_mean.correction
        )
        if not (mean_of_squares or variance):
            continue
        with graph.inserting_before(node):
            plus_eps = graph.call_function(torch.ops.aten.add.Tensor, (arg, 0.0))
        plus_eps.meta = dict(arg.meta)
        node.replace_input_with(arg, plus_eps)
        restored += 1
    return restored


def canonicalize_mean_dims(graph: torch.fx.Graph) -> int:
    """Write a mean over the last dim as the hand-written norm patterns do, ``dim=-1``; returns how many
    nodes changed: ``h.pow(2).mean(2, keepdim=True)`` of a 3-D ``h`` reduces the same elements as
    ``mean(-1, ...)``, and the pattern matcher, which re-traces a candidate match with its real shapes,
    takes only the index the pattern's code wrote. A mean over any other dim (the sequence, a batch)
    keeps its index, and so stays unfused. (F.rms_norm decomposes to the positive index: its rule
    matches before this runs.)"""
    changed = 0
    for node in graph.find_nodes(op="call_function", target=torch.ops.aten.mean.dim):
        val = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else None
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if not isinstance(val, torch.Tensor) or not isinstance(dims, (list, tuple)) or len(dims) != 1:
            continue
        if isinstance(dims[0], int) and dims[0] >= 0 and dims[0] == val.dim() - 1:
            if len(node.args) > 1:
                node.args = (node.args[0], [-1], *node.args[2:])
            else:
                node.kwargs = {**node.kwargs, "dim": [-1]}
            changed += 1
    return changed


def _move_getitems(source: torch.fx.Node, target: torch.fx.Node) -> None:
    """Point the users of source's outputs at target's (one getitem per output index)."""
    by_index = {u.args[1]: u for u in target.users if u.target is operator.getitem}
    for user in list(source.users):
        index = user.args[1] if user.target is operator.getitem else None
        if index in by_index:
            user.replace_all_uses_with(by_index[index])
            user.graph.erase_node(user)
        else:
            user.replace_input_with(source, target)
            if index is not None:
                by_index[index] = user


# The ops a private producer copy may hold (see share_producers_by_copy): cheap, pure elementwise and
# reduction ops, the pieces of the norm and activation decompositions in post-grad graphs. Never a
# matmul, a placeholder, a get_attr or a view (none of the rules needs one inside the copy).
_COPYABLE_OPS = frozenset(
    [torch.ops.prims.convert_element_type]
    + [
        getattr(torch.ops.aten, name)
        for name in (
            "pow", "mean", "sum", "var_mean", "add", "sub", "mul", "div", "rsqrt", "sqrt", "neg", "reciprocal",
            "square",
            # activation pieces (a gated activation read by several quantizes)
            "silu", "gelu", "sigmoid", "exp", "tanh", "erf", "relu",
        )
    ]
)
# a private copy larger than this is not made (the norm decompositions have about a dozen nodes)
_MAX_COPY_NODES = 48


def _copyable(node: torch.fx.Node) -> bool:
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:  # an output of a copyable multi-output op (var_mean)
        return isinstance(node.args[0], torch.fx.Node) and _copyable(node.args[0])
    packet = getattr(node.target, "overloadpacket", None)
    return packet in _COPYABLE_OPS and not node.is_impure()


def private_producer_cone(node: torch.fx.Node) -> set[torch.fx.Node]:
    """`node` and the nodes that feed only it (transitively: every user of each is in the cone), walking
    back through copyable ops. Empty if `node` itself is not copyable or the cone is too large. A node with
    a user outside the cone (a residual sum the next residual add also reads, an input read elsewhere)
    stays outside: the copies share it."""
    if not _copyable(node):
        return set()
    cone = {node}
    grown = True
    while grown:  # to a fixed point: a source read by two members joins once both are in
        grown = False
        for member in list(cone):
            for source in member.all_input_nodes:
                if source not in cone and _copyable(source) and all(user in cone for user in source.users):
                    cone.add(source)
                    grown = True
        if len(cone) > _MAX_COPY_NODES:
            return set()
    return cone


def copies_save_traffic(output: torch.fx.Node, cone: set[torch.fx.Node], readers: int) -> bool:
    """Whether `readers` fused copies of `cone` move fewer bytes than the cone computed once: each copy
    reads the cone's S inputs of the output's size (a norm: its input, S = 1; a gated activation: gate
    and up, S = 2), where the cone computed once reads them, writes its output and each quantize reads
    that: readers * S <= S + 1 + readers (always for S = 1; up to 3 readers for S = 2)."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    out = output.meta.get("val")
    if not isinstance(out, torch.Tensor):
        return False
    sources = {a for member in cone for a in member.all_input_nodes if a not in cone}
    full = 0
    for source in sources:
        val = source.meta.get("val")
        if isinstance(val, torch.Tensor) and statically_known_true(val.numel() == out.numel()):
            full += 1
    return readers * full <= full + 1 + readers


@dataclasses.dataclass
class ProducerCopies:
    """What share_producers_by_copy did: `copies` maps each copied node to its original; `outputs` holds the
    copy of the shared output made for each quantize beyond the first."""

    copies: dict[torch.fx.Node, torch.fx.Node] = dataclasses.field(default_factory=dict)
    outputs: list[torch.fx.Node] = dataclasses.field(default_factory=list)


def share_producers_by_copy(graph: torch.fx.Graph, quantizes: Sequence[torch.fx.Node]) -> ProducerCopies:
    """Give each quantize of a shared producer output its own copy of that producer, so that each can fuse.

    A norm output read by several quantizes that merge_duplicate_quantizes could not merge (q/k/v
    projections with separate static global scales, e.g. loaded from a checkpoint, or different recipes)
    has several users, and Inductor's matcher refuses a match whose intermediate has other users. For each
    node whose users are two or more quantizes (as input) and nothing else, every quantize beyond the first
    gets a private copy of the node's `private_producer_cone` (placed next to the originals), so the rules
    can match each quantize with its own norm: one fused op per quantize, each recomputing the norm from
    its input (fewer bytes than the norm's output written once and read by every quantize). Inputs of the
    cone (the norm input, a residual sum that is also the next residual, weights) stay shared; for an
    add + RMSNorm the first match takes the sum, the others read the sum the fused op returns.
    Copies that do not end up fused are undone by `undo_unfused_copies`. `quantizes`: the graph's
    quantize nodes (after merge_duplicate_quantizes); their inputs are the candidates."""
    result = ProducerCopies()
    order = {n: i for i, n in enumerate(graph.nodes)}
    groups = []
    inputs = {q.args[0] for q in quantizes if isinstance(q.args[0], torch.fx.Node)}
    for node in sorted(inputs, key=order.__getitem__):
        users = list(node.users)
        if len(users) < 2 or not all(u.target is QUANTIZE and u.args[0] is node for u in users):
            continue
        if any(node in u.args[1:] or node in u.kwargs.values() for u in users):
            continue
        cone = private_producer_cone(node)
        if cone and copies_save_traffic(node, cone, len(users)):
            groups.append((node, sorted(users, key=order.__getitem__), sorted(cone, key=order.__getitem__)))
    # the cones of different outputs are disjoint (a cone holds no quantize), so copying one leaves the
    # others as they were computed
    for output, readers, cone in groups:
        for quantize in readers[1:]:
            env: dict[torch.fx.Node, torch.fx.Node] = {}
            for original in cone:
                # next to the original: after its inputs and after the copies of the cone members it reads
                with graph.inserting_after(original):
                    copy = graph.node_copy(original, lambda n: env.get(n, n))
                env[original] = copy
                result.copies[copy] = original
            quantize.replace_input_with(output, env[output])
            result.outputs.append(env[output])
    return result


def undo_unfused_copies(graph: torch.fx.Graph, copies: ProducerCopies) -> tuple[int, int]:
    """After the rules ran: every copied node still in the graph whose original is too (its match failed,
    or it was not part of the matched pattern) is replaced by its original, so a failed match never leaves
    duplicated computation. Returns (copies of a shared output that fused, copies undone)."""
    alive = set(graph.nodes)  # before the undo: an undone copy still counts as alive below
    fused = sum(1 for output in copies.outputs if output not in alive)
    order = {n: i for i, n in enumerate(graph.nodes)}
    remaining = sorted((c for c in copies.copies if c in alive), key=order.__getitem__, reverse=True)
    for copy in remaining:
        original = copies.copies[copy]
        if original not in alive:
            continue  # the original was fused away: this copy is the only one left
        copy.replace_all_uses_with(original)
        graph.erase_node(copy)
    undone = sum(1 for output in copies.outputs if output in alive and copies.copies[output] in alive)
    return fused, undone


def quantize_args_of(node: torch.fx.Node) -> QuantizeArgs | None:
    """The QuantizeArgs of a quantize node, or None if an argument is not a constant."""
    gs, *flags = _quantize_arg_values(node)
    if not all(isinstance(f, (bool, int)) for f in flags):
        return None
    return QuantizeArgs(*flags, has_global_scale=gs is not None)


def tensor_meta(match: pm.Match, name: str) -> torch.Tensor | None:
    """The fake tensor bound to pattern argument `name` in a match (None if absent or not a tensor)."""
    node = match.kwargs.get(name)
    if not isinstance(node, torch.fx.Node):
        return None
    value = node.meta.get("val")
    return value if isinstance(value, torch.Tensor) else None


def quantized_value_read_elsewhere(match: pm.Match) -> bool:
    """Whether the tensor the matched quantize reads also has other users (the norm output a
    *_with_normed rule returns to them)."""
    for node in match.nodes:
        if node.target is QUANTIZE:
            source = node.args[0]
            return isinstance(source, torch.fx.Node) and len(source.users) > 1
    return False


def same_model_dtype(match: pm.Match, names: Sequence[str]) -> bool:
    """All tensors bound to `names` exist and share one dtype the fused kernels compute (fp16/bf16)."""
    metas = [tensor_meta(match, n) for n in names]
    if any(m is None for m in metas):
        return False
    dtypes = {m.dtype for m in metas}
    return len(dtypes) == 1 and dtypes.pop() in _MODEL_DTYPES


def same_shape(a: torch.Tensor, b: torch.Tensor | Sequence) -> bool:
    """Shapes equal for every value of their symbols (no guard is added)."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    sa, sb = tuple(a.shape), tuple(b.shape if isinstance(b, torch.Tensor) else b)
    return len(sa) == len(sb) and all(statically_known_true(x == y) for x, y in zip(sa, sb))


def scalar_tensor(value: Any) -> bool:
    """`value` is a graph node whose value is a floating-point tensor that acts as a scalar in float32
    arithmetic: 0-d (it does not take part in type promotion), or one float32 element in at most one
    dimension (more would broadcast a 1-D or 2-D operand to more dimensions than the fused op returns)."""
    meta = value.meta.get("val") if isinstance(value, torch.fx.Node) else None
    return (
        isinstance(meta, torch.Tensor)
        and meta.dtype.is_floating_point
        and (meta.dim() == 0 or (meta.dtype == torch.float32 and meta.numel() == 1 and meta.dim() == 1))
    )


def hoist_scalar_conversions(graph: torch.fx.Graph) -> None:
    """Move the dtype conversions of 0-d graph inputs (Dynamo's tensor form of a module's float eps,
    converted to float32 right where it is used) up to the graph inputs. A replacement is inserted where
    the matched nodes start, which can be before such a conversion (e.g. a residual add precedes the
    norm's `+ eps`); hoisted, every scalar a replacement takes is defined before it."""
    placeholders = list(graph.find_nodes(op="placeholder"))
    if not placeholders:
        return
    anchor = placeholders[-1]
    for node in list(graph.find_nodes(op="call_function", target=torch.ops.prims.convert_element_type.default)):
        source = node.args[0]
        if isinstance(source, torch.fx.Node) and source.op == "placeholder" and scalar_tensor(node):
            anchor.append(node)
            anchor = node


def _input_size_sources(graph: torch.fx.Graph) -> dict:
    """Each size symbol of the graph's inputs -> (the input, its dim; None for a SymInt input)."""
    sources: dict = {}
    for p in graph.find_nodes(op="placeholder"):
        val = p.meta.get("val")
        if isinstance(val, torch.SymInt) and isinstance(val.node.expr, sympy.Symbol):
            sources.setdefault(val.node.expr, (p, None))
        elif isinstance(val, torch.Tensor):
            for i, size in enumerate(val.shape):
                if isinstance(size, torch.SymInt) and isinstance(size.node.expr, sympy.Symbol):
                    sources.setdefault(size.node.expr, (p, i))
    return sources


def _buildable_size(expr, sources: dict) -> bool:
    """`expr` is an integer, an input size symbol, or sums and products of those."""
    if isinstance(expr, sympy.Integer):
        return True
    if isinstance(expr, sympy.Symbol):
        return expr in sources
    return isinstance(expr, (sympy.Mul, sympy.Add)) and all(_buildable_size(arg, sources) for arg in expr.args)


def _size_from_inputs(graph: torch.fx.Graph, expr, sources: dict):
    """An FX value computing the _buildable_size expression `expr` from the graph inputs, inserted at
    the current insertion point."""
    if isinstance(expr, sympy.Integer):
        return int(expr)
    if isinstance(expr, sympy.Symbol):
        source, dim = sources[expr]
        if dim is None:
            return source
        node = graph.call_function(torch.ops.aten.sym_size.int, (source, dim))
        node.meta["val"] = source.meta["val"].shape[dim]
        return node
    combine = operator.mul if isinstance(expr, sympy.Mul) else operator.add
    terms = [_size_from_inputs(graph, arg, sources) for arg in expr.args]
    value = terms[0]
    for term in terms[1:]:
        node = graph.call_function(combine, (value, term))
        vals = [t.meta["val"] if isinstance(t, torch.fx.Node) else t for t in (value, term)]
        node.meta["val"] = combine(*vals)
        value = node
    return value


def size_reads_from_inputs(graph: torch.fx.Graph) -> bool:
    """Compute the sizes the graph reads of intermediate tensors (``aten.sym_size.int``) from its inputs'
    sizes instead. Under ``dynamic=True`` ``torch.zeros_like(h)`` of a norm output flattened to rows
    (``h = norm(x).view(-1, D)``, as MoE blocks write) reads ``sym_size(view, 0)``: a user of the norm
    output besides the quantize, which would keep the rules from fusing it. The size is an expression of
    input sizes (``s0 * s1``), rebuilt from them; the view, left unread, goes. True where a read moved."""
    sources = _input_size_sources(graph)
    moved = False
    for node in list(graph.find_nodes(op="call_function", target=torch.ops.aten.sym_size.int)):
        tensor, val = node.args[0], node.meta.get("val")
        if not isinstance(tensor, torch.fx.Node) or tensor.op == "placeholder" or not isinstance(val, torch.SymInt):
            continue
        expr = val.node.expr
        if not _buildable_size(expr, sources):
            continue
        with graph.inserting_before(node):
            size = _size_from_inputs(graph, expr, sources)
        node.replace_all_uses_with(size)
        graph.erase_node(node)
        moved = True
    return moved


def _movable(node: torch.fx.Node) -> bool:
    """A node whose place among its neighbours does not matter: pure, and no random numbers (their order
    sets what each draws)."""
    if node.op == "get_attr":
        return True
    if node.op != "call_function" or node.is_impure():
        return False
    return torch.Tag.nondeterministic_seeded not in getattr(node.target, "tags", ())


def inputs_before_outputs(match: pm.Match, names: Sequence[str]) -> bool:
    """Inductor inserts a replacement before the first of the match's outputs, so that readers of an
    output between it and the quantize (the residual sum's) still see it defined. The fused op's other
    inputs must be defined there too: a global scale or a norm weight computed after the residual add
    (`1 / input_scale`, `w.to(x.dtype)` in forward) is moved up with what it needs, where that is pure and
    does not depend on the match; False where it does (a scale from the amax of the sum: no order works)."""
    outputs = [n for n in match.output_nodes() if isinstance(n, torch.fx.Node)]
    if len(outputs) < 2:
        return True  # the replacement goes before its one output, which reads every input
    order = {n: i for i, n in enumerate(match.graph.nodes)}
    anchor = min(outputs, key=order.__getitem__)
    matched = set(match.nodes)
    late: list[torch.fx.Node] = []
    seen: set[torch.fx.Node] = set()

    def gather(node: torch.fx.Node) -> bool:
        if node in seen or order[node] < order[anchor]:
            return True
        seen.add(node)
        if node in matched or not _movable(node) or not all(gather(n) for n in node.all_input_nodes):
            return False
        late.append(node)
        return True

    if not all(gather(v) for v in (match.kwargs.get(n) for n in names) if isinstance(v, torch.fx.Node)):
        return False
    for node in sorted(late, key=order.__getitem__):
        anchor.prepend(node)
    return True


def constant_scalars(
    match: pm.Match, argnames: Sequence[str], scalars: Sequence[str], tensor_ok: Sequence[str] = ()
) -> bool:
    """No scalar parameter (eps) of the match is bound to a graph value, except those in `tensor_ok`,
    which may be bound to a scalar tensor (see scalar_tensor). Under ``dynamic=True`` Dynamo passes a
    module's float attribute used in tensor arithmetic (``variance + self.variance_epsilon`` in Hugging
    Face's RMSNorm modules) as a 0-d tensor graph input; a rule whose fused op has a Tensor-eps variant
    takes it, the others cannot be rewritten (the value is only known at run time). `argnames`: the
    pattern's parameters in order. torch 2.14 binds the scalars by name (match.kwargs); torch 2.11 binds
    them after this check, so there a graph value shows as an input of the matched nodes that no
    parameter holds."""
    unbound = []
    for name in scalars:
        position = argnames.index(name)
        if name in match.kwargs:
            value = match.kwargs[name]
        elif position < len(match.args):
            value = match.args[position]
        else:
            unbound.append(name)
            continue
        if isinstance(value, (torch.fx.Node, torch.Tensor)) and not (name in tensor_ok and scalar_tensor(value)):
            return False
    if unbound:
        bound = [v for v in (*match.args, *match.kwargs.values()) if isinstance(v, torch.fx.Node)]
        matched = set(match.nodes)
        external = {a for node in match.nodes for a in node.all_input_nodes if a not in matched and a not in bound}
        # each unbound scalar may account for one external scalar tensor, if the rule takes it as one
        if len(external) > sum(name in tensor_ok for name in unbound) or not all(map(scalar_tensor, external)):
            return False
    return True


_NO_DEFAULT = object()


def _schema_default(target: Any, name: str) -> Any:
    schema = getattr(target, "_schema", None)
    for argument in schema.arguments if schema is not None else ():
        if argument.name == name:
            return argument.default_value if argument.has_default_value() else _NO_DEFAULT
    return _NO_DEFAULT


def unmatched_keywords(match: pm.Match) -> list[tuple[torch.fx.Node, str]]:
    """Keyword arguments of matched nodes that the pattern does not have, where they differ from the op's
    default. Inductor's matcher drops a node's keyword arguments that its pattern node lacks, so e.g.
    ``torch.add(x, r, alpha=0.5)`` would match the pattern's ``x + r``."""
    found = []
    for pattern, node in match.ctx.pattern_to_node.items():
        if not isinstance(pattern, pm._TargetArgsExpr) or not isinstance(node, torch.fx.Node):
            continue
        for name, value in node.kwargs.items():
            if name in pattern.kwargs:
                continue
            default = _schema_default(node.target, name)
            same = value == default and isinstance(value, bool) == isinstance(default, bool)
            if default is _NO_DEFAULT or not same:
                found.append((node, name))
    return found


def make_function(names: Sequence[str], body: Callable[..., Any]) -> Callable[..., Any]:
    """A function of positional parameters `names` that calls body(**named arguments):
    register_replacement reads the parameter names from the signature."""

    def function(*args):
        return body(**dict(zip(names, args)))

    function.__signature__ = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]
    )
    function.__name__ = body.__name__
    return function


def trace_functional(fn: Callable[..., Any], args: Sequence[Any], **kwargs: Any) -> torch.fx.GraphModule:
    """Trace `fn` into the form of a post-grad graph: Inductor's `fwd_only` (decomposed), then
    functionalized. Post-grad graphs are functional, while some decompositions mutate (F.rms_norm's
    adds eps in place), and functionalizing `fn` before decomposing does not reach those mutations."""
    from torch.fx.experimental.proxy_tensor import make_fx

    decomposed = pm.fwd_only(fn, args, **kwargs)
    gm = make_fx(torch.func.functionalize(decomposed, remove="mutations"), tracing_mode="real")(*args)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


class FusionPattern:
    """One rewrite rule: `pattern(**inputs)` followed by fp4op.quantize becomes `replacement(**inputs)`.

    Subclasses set `name` (the counter key), list their tensor inputs and scalar parameters, and
    implement `pattern`, `replacement` and, where needed, `check` (dtype/shape conditions on the match).
    `pattern` returns the tensor that is quantized, or a tuple (that tensor, extra outputs...) for
    values the fused op also returns (the residual sum); `replacement` returns the fused op's outputs.
    """

    name: str = ""
    # scalar parameters and their float32-exact placeholder values (distinct from each other)
    scalars: dict[str, float] = {}
    # the scalar parameters that `replacement` also takes as a scalar tensor graph value
    tensor_scalars: tuple[str, ...] = ()
    # the pattern also returns the quantized value (a norm output with another reader, a post-norm residual
    # sum); such rules register only for graphs where a quantized value has another reader
    keep_normed: bool = False

    def tensor_inputs(self, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def pattern(self, **kw) -> Any:
        raise NotImplementedError

    def replacement(self, q: QuantizeArgs, **kw) -> Any:
        raise NotImplementedError

    def check(self, match: pm.Match) -> bool:
        return True

    def search(self, q: QuantizeArgs, **kw):
        """The traced search function: `pattern` followed by the quantize."""
        out = self.pattern(**kw)
        if isinstance(out, tuple):
            x_q, sf = q.quantize(out[0], kw.get("global_scale"))
            return (x_q, sf, *out[1:])
        return q.quantize(out, kw.get("global_scale"))

    def register(self, pass_: "FusionPass", q: QuantizeArgs, device: str) -> None:
        inputs = self.tensor_inputs(torch.bfloat16, device)
        if q.has_global_scale:
            inputs["global_scale"] = torch.ones(1, dtype=torch.float32, device=device)
        names = [*inputs, *self.scalars]
        gs_free = {} if q.has_global_scale else {"global_scale": None}

        def search(**kw):
            return self.search(q, **kw, **gs_free)

        def replace(**kw):
            return self.replacement(q, **kw, **gs_free)

        search.__name__ = f"{type(self).__name__}_pattern"
        replace.__name__ = f"{type(self).__name__}_replacement"

        def extra_check(match: pm.Match) -> bool:
            if not constant_scalars(match, names, list(self.scalars), self.tensor_scalars):
                log.debug("fp4op.fusion: %s not applied: a scalar parameter is not a constant", self.name)
                return False
            extra = unmatched_keywords(match)
            if extra:
                log.debug("fp4op.fusion: %s not applied: keyword arguments %s", self.name, [n for _, n in extra])
                return False
            if not self.check(match):
                return False
            if not inputs_before_outputs(match, names):
                log.debug("fp4op.fusion: %s not applied: an input of the fused op depends on its outputs", self.name)
                return False
            pass_.note_match(self.name)
            return True

        pm.register_replacement(
            make_function(names, search),
            make_function(names, replace),
            list(inputs.values()),
            trace_functional,
            pass_.patterns,
            extra_check=extra_check,
            scalar_workaround=dict(self.scalars),
            skip_duplicates=True,
        )


@dataclasses.dataclass
class GraphRecord:
    """What the pass saw in one graph: op counts before and after, the matches per rule, and how many
    quantizes fused with a private copy of a producer they shared (share_producers_by_copy)."""

    before: collections.Counter
    after: collections.Counter
    matches: collections.Counter
    producer_copies: int = 0


def op_counts(graph: torch.fx.Graph) -> collections.Counter:
    """Counts of call_function targets in a graph, keyed by their names (e.g. 'fp4op.quantize.default')."""
    counts = collections.Counter()
    for node in graph.nodes:
        if node.op == "call_function" and node.target is not operator.getitem:
            counts[_target_name(node.target)] += 1
    return counts


def _target_name(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._opname}.{target._overloadname}"
    return getattr(target, "__name__", str(target))


def _source_files() -> tuple[str, ...]:
    """The pass's sources, and fp4op/fused_ops.py, whose per-sample shape rule the adaLN rules check with."""
    from .. import fused_ops

    here = os.path.dirname(os.path.abspath(__file__))
    return (*sorted(glob.glob(os.path.join(here, "*.py"))), os.path.abspath(fused_ops.__file__))


class FusionPass(CustomGraphPass):
    """The fp4op fusion pass (a post-grad custom pass). One instance serves any number of compiles."""

    # marks instances of this class across module reloads (composition checks use it, not isinstance)
    fp4op_fusion_pass = True

    def __init__(self, rules: Sequence[FusionPattern] | None = None, keep_records: int = 64):
        self.patterns = pm.PatternMatcherPass(pass_name="fp4op_fusion")
        self._rules = list(rules) if rules is not None else None
        self._registered: set[tuple[QuantizeArgs, str]] = set()
        self.counts: collections.Counter = collections.Counter()
        # private producer copies (share_producers_by_copy): "fused" (kept, fused) and "undone"
        self.copy_counts: collections.Counter = collections.Counter()
        self.records: collections.deque[GraphRecord] = collections.deque(maxlen=keep_records)
        self._current: collections.Counter | None = None

    @property
    def rules(self) -> list[FusionPattern]:
        if self._rules is None:
            from . import all_rules

            self._rules = all_rules()
        return self._rules

    def note_match(self, rule_name: str) -> None:
        self.counts[rule_name] += 1
        counters["fp4op_fusion"][rule_name] += 1  # next to Inductor's own pattern counters
        if self._current is not None:
            self._current[rule_name] += 1

    def reset(self) -> None:
        """Forget the counters and records (the registered rules stay)."""
        self.counts.clear()
        self.copy_counts.clear()
        self.records.clear()

    def _ensure_registered(self, q: QuantizeArgs, device: str, read_elsewhere: bool = True) -> None:
        """Registers the rules for quantizes of `q` on `device` (once: registering traces every pattern).
        The rules that keep the norm output (`keep_normed`, a third of them) only with `read_elsewhere`,
        where some quantized value also has another reader: a graph without one skips their tracing."""
        for keep_normed in (False, True) if read_elsewhere else (False,):
            key = (q, device, keep_normed)
            if key in self._registered:
                continue
            self._registered.add(key)
            rules = [rule for rule in self.rules if rule.keep_normed == keep_normed]
            for rule in rules:
                rule.register(self, q, device)
            log.debug("fp4op.fusion: registered %d rules for %s on %s", len(rules), q.label(), device)

    def __call__(self, graph: torch.fx.Graph) -> None:
        before = op_counts(graph)
        quantizes = canonicalize_quantize(graph)
        quantize_before_row_views(graph, quantizes)
        compute_sliced_rows_only(graph, quantizes)
        quantizes = merge_duplicate_quantizes(graph, quantizes)
        matches: collections.Counter = collections.Counter()
        fused_copies = 0
        if quantizes:
            hoist_scalar_conversions(graph)
            if size_reads_from_inputs(graph):
                graph.eliminate_dead_code()
            canonicalize_variances(graph)
            restore_zero_eps(graph)
            canonicalize_rsqrt_products(graph)
            for node in quantizes:
                q = quantize_args_of(node)
                val = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else None
                if q is None or not isinstance(val, torch.Tensor):
                    continue
                self._ensure_registered(q, val.device.type, len(node.args[0].users) > 1)
            copies = share_producers_by_copy(graph, quantizes)
            self._current = matches
            try:
                self.patterns.apply(graph)
                # A second round where duplicate conversions blocked a norm: merged only after the first,
                # so that a conversion the pattern needs private is not merged with one read elsewhere,
                # and only without producer copies, which undo_unfused_copies must find as it made them.
                if not copies.outputs and merge_duplicate_conversions(graph):
                    canonicalize_variances(graph)  # x.float() * x.float() is a square only now
                    restore_zero_eps(graph)
                    self.patterns.apply(graph)
                # A last round for the means over the last dim written as its index: only after the
                # others, whose F.rms_norm forms decompose to that index and match only as traced. (It
                # edits arguments only, so producer copies stay as undo_unfused_copies made them.)
                if canonicalize_mean_dims(graph):
                    self.patterns.apply(graph)
            finally:
                self._current = None
            if copies.outputs:
                fused_copies, undone = undo_unfused_copies(graph, copies)
                self.copy_counts["fused"] += fused_copies
                self.copy_counts["undone"] += undone
                log.info(
                    "fp4op.fusion: %d producer outputs read by several quantizes copied for %d quantizes: "
                    "%d copies fused, %d undone",
                    len({copies.copies[o] for o in copies.outputs}), len(copies.outputs), fused_copies, undone,
                )
            if matches or copies.outputs:
                graph.eliminate_dead_code()
            if matches:
                log.info("fp4op.fusion: %d fusions: %s", sum(matches.values()), dict(matches))
            restore_launch_options(graph)
        self.records.append(GraphRecord(before, op_counts(graph), matches, fused_copies))

    def uuid(self) -> bytes:
        return get_hash_for_files(_source_files(), extra=f"fp4op-fusion torch={torch.__version__}")


def is_fusion_pass(p: Any) -> bool:
    return bool(getattr(p, "fp4op_fusion_pass", False))


class ComposedPass(CustomGraphPass):
    """Runs several post-grad passes in order, as one pass object (torch 2.11 takes a single pass in
    post_grad_custom_post_pass; newer versions also take a list). Its uuid combines the members' uuids;
    a member without one (a plain function) makes it None, which tells Inductor not to cache."""

    # marks instances across module reloads
    fp4op_composed_pass = True

    def __init__(self, passes: Sequence[Callable[[torch.fx.Graph], None]]):
        self.passes = tuple(passes)

    def __call__(self, graph: torch.fx.Graph) -> None:
        for p in self.passes:
            p(graph)

    def uuid(self) -> Any:
        uuids = []
        for p in self.passes:
            u = p.uuid() if isinstance(p, CustomGraphPass) else None
            if u is None:
                return None
            uuids.append(u)
        return ("fp4op.ComposedPass", *uuids)


def _flatten(existing: Any) -> list:
    if existing is None:
        return []
    if isinstance(existing, (list, tuple)):
        return [q for p in existing for q in _flatten(p)]
    if getattr(existing, "fp4op_composed_pass", False):
        return [q for p in existing.passes for q in _flatten(p)]
    return [existing]


def compose_with(existing: Any, fusion_pass: FusionPass) -> CustomGraphPass:
    """`existing` (None, a pass, or a list of passes) followed by `fusion_pass`, as one pass object.
    Idempotent: an fp4op fusion pass already in `existing` is replaced, never doubled."""
    others = [p for p in _flatten(existing) if not is_fusion_pass(p)]
    if not others:
        return fusion_pass
    return ComposedPass([*others, fusion_pass])
