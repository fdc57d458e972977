"""fp4op.fusion: Inductor passes that fuse a norm or activation with the FP4 quantize after it.

Turn it on with one of::

    compiled = torch.compile(model, options=fp4op.fusion.compile_options())

    with fp4op.fusion.enabled():
        compiled = torch.compile(model)
        compiled(x)          # compilation happens here, inside the block

(``torch.compile`` takes either ``mode=`` or ``options=``: with a `mode`, use ``enabled()``.)
Both keep a post-grad custom pass the user already set in
``torch._inductor.config.post_grad_custom_post_pass`` (it runs first, then fp4op's), and enabling twice
never runs the fp4op pass twice. ``match_counts()`` reports the rewrites per rule; ``last_record()``
the ops of the last compiled graph before and after the pass.

Rules (fusion/rms_norm.py, layer_norm.py, activation.py), each followed by ``fp4op.quantize`` (called
directly, through ``fp4op.fp4_quantize`` or ``fp4op.nn.FP4Linear``):

* RMSNorm (F.rms_norm / nn.RMSNorm, Hugging Face Llama, Gemma ``1 + weight``, T5LayerNorm, the
  reference Llama ``norm(x.float()).type_as(x) * weight``), with or without weight,
  any eps, optionally after a residual add whose sum is reused -> ``fp4op.rms_norm_quantize`` /
  ``fp4op.add_rms_norm_quantize``;
* LayerNorm (F.layer_norm / nn.LayerNorm) with weight and bias, weight only, or neither ->
  ``fp4op.layer_norm_quantize``;
* any of those norms whose output is also read elsewhere (post-LN encoders, where it is the next residual
  too; an MoE block's router gate and experts; an output also returned) ->
  ``fp4op.rms_norm_quantize_with_normed`` / ``add_rms_norm_quantize_with_normed`` /
  ``layer_norm_quantize_with_normed``, which return the norm output to those readers;
* a residual added after any of those RMSNorms, ``residual + norm(x)`` (either order), quantized and
  reused (OLMo2's post-norm residual stream) -> ``fp4op.rms_norm_add_quantize``, which returns the sum;
* a LayerNorm followed by diffusion transformers' adaLN modulation, ``norm(x) * (1 + scale[:, None]) +
  shift[:, None]`` (either factor order, the shift on either side; scale and shift a sample's rows or one
  vector) -> ``fp4op.layer_norm_modulate_quantize``;
* ``silu(gate) * up`` / ``gelu(gate) * up`` (either operand order, exact or tanh GELU) ->
  ``fp4op.silu_and_mul_quantize`` / ``fp4op.gelu_and_mul_quantize``; plain SiLU / GELU ->
  ``fp4op.silu_quantize`` / ``fp4op.gelu_quantize``.

Inference graphs: compile under ``torch.no_grad()`` / ``torch.inference_mode()`` (a training graph keeps
the norm output for the backward, a second user). Quantize calls with identical arguments (one norm
output read by q/k/v or gate/up layers with one shared scale, see ``fp4op.nn.calibrate``) are merged
first, so such a norm still fuses. A norm/activation output read only by quantizes that differ (separate
scale tensors, e.g. loaded from a checkpoint, or other recipes) gets a private copy per quantize, and each
fuses (one fused op per quantize; copies that do not fuse are folded back, ``FusionPass.copy_counts``).

A chain is left alone when an intermediate other than a norm output has another user, or the norm
output also feeds something the quantize depends on (e.g. an amax:
FP4Linear's dynamic activation scale; its default calibrated static scale keeps the chain fusable),
when the norm runs over more than the last dim, when the quantized tensor is not the norm/activation
output, or when the dtypes are not the fused kernels' (fp16/bf16 activations, weights of the same dtype).

Keyword arguments: Inductor's matcher ignores a node's keyword arguments its pattern lacks; a match with
one that changes the result (``torch.add(x, r, alpha=0.5)``) is left alone. Under ``dynamic=True`` Dynamo
passes a module's float attribute used in tensor arithmetic (the eps of the Hugging Face RMSNorm forms)
as a 0-d tensor graph input: the RMSNorm rules then call the fused ops' ``*_eps_tensor`` variants.

Caching: the pass has a stable uuid, so Inductor's FX graph cache stays correct; on a cache hit the
pass does not run (the cached code is already fused) and the counters do not move. Disable the caches
(``torch._inductor.config.fx_graph_cache = False``, ``torch._functorch.config.enable_autograd_cache =
False``) to see the counts of every compile.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from torch._inductor import config as inductor_config

from . import activation, layer_norm, rms_norm
from .pass_manager import ComposedPass, FusionPass, FusionPattern, GraphRecord, QuantizeArgs, compose_with


def all_rules() -> list[FusionPattern]:
    """Every rule, in matching order (a rule listed first wins where two match at the same quantize)."""
    return [*rms_norm.rules(), *layer_norm.rules(), *activation.rules()]


_PASS: FusionPass | None = None


def fusion_pass() -> FusionPass:
    """The process-wide fusion pass object (created on first use)."""
    global _PASS
    if _PASS is None:
        _PASS = FusionPass()
    return _PASS


def post_grad_pass(existing: Any = None) -> Any:
    """The value for ``post_grad_custom_post_pass``: `existing` (a pass, a list of passes or None) followed
    by the fusion pass, as a single pass object (works on torch versions that take one pass or a list)."""
    return compose_with(existing, fusion_pass())


def compile_options(existing_pass: Any = None, **options: Any) -> dict[str, Any]:
    """``options`` for ``torch.compile`` that enable the fusion. The post-grad pass set in Inductor's
    config (and `existing_pass`, if given) keeps running before the fusion pass. Extra `options` are
    passed through."""
    current = inductor_config.post_grad_custom_post_pass
    base = [p for p in (current, existing_pass) if p is not None]
    return {**options, "post_grad_custom_post_pass": post_grad_pass(base)}


@contextlib.contextmanager
def enabled() -> Iterator[FusionPass]:
    """Enable the fusion for compilations inside the block (keeping any pass already configured)."""
    previous = inductor_config.post_grad_custom_post_pass
    inductor_config.post_grad_custom_post_pass = post_grad_pass(previous)
    try:
        yield fusion_pass()
    finally:
        inductor_config.post_grad_custom_post_pass = previous


def match_counts() -> dict[str, int]:
    """Rewrites per rule since the process started (or `reset()`)."""
    return dict(fusion_pass().counts)


def last_record() -> GraphRecord | None:
    """Ops of the last graph the pass ran on, before and after it, and its matches."""
    records = fusion_pass().records
    return records[-1] if records else None


def reset() -> None:
    """Clear the counters and records."""
    fusion_pass().reset()


__all__ = [
    "compile_options",
    "enabled",
    "match_counts",
    "last_record",
    "reset",
    "fusion_pass",
    "post_grad_pass",
    "all_rules",
    "FusionPass",
    "FusionPattern",
    "ComposedPass",
    "GraphRecord",
    "QuantizeArgs",
]
