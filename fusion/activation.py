"""Activation -> quantize rules.

* gated: ``F.silu(gate) * up`` and ``F.gelu(gate, approximate=...) * up`` (also ``up * act(gate)``);
  gate and up may come from anything (two projections, chunk, split, slicing of one projection) ->
  fp4op.silu_and_mul_quantize / fp4op.gelu_and_mul_quantize; the same with ``gelu_new`` (T5 v1.1 /
  Flan-T5's gated-gelu) and ``F.relu`` / the squared ReLU below -> fp4op.gelu_new_and_mul_quantize /
  fp4op.relu_and_mul_quantize;
* plain: ``F.silu(x)`` / ``nn.SiLU``, ``F.gelu(x, approximate=...)`` / ``nn.GELU`` ->
  fp4op.silu_quantize / fp4op.gelu_quantize;
* Hugging Face's ``gelu_new`` (GPT-2's activation, minGPT's NewGELU), the tanh GELU written out
  (``torch.pow(x, 3.0)`` or ``x ** 3``) -> fp4op.gelu_new_quantize, which rounds after every op as
  eager does; under ``dynamic=True`` its factor ``math.sqrt(2.0 / math.pi)`` arrives as a 0-d tensor
  (Dynamo lifts ``math.pi``), which the op then takes as ``sqrt_2_over_pi``;
* ``x * torch.sigmoid(1.702 * x)`` (QuickGELU: CLIP, OpenCLIP, Hugging Face's ``quick_gelu``) and
  ``x * torch.sigmoid(x)`` (SiLU written out; also ``sigmoid(...) * x``) -> fp4op.sigmoid_mul_quantize,
  which rounds after each op as eager does;
* ``F.relu(x)`` / ``nn.ReLU`` (OPT, T5 v1.0) and the squared ReLU ``F.relu(x) ** 2`` (also
  ``.pow(2)``, ``torch.square``, ``r * r``; Primer, Nemotron, modded-nanogpt) -> fp4op.relu_quantize.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch._inductor import pattern_matcher as pm

from .pass_manager import FusionPattern, QuantizeArgs, same_model_dtype, same_shape, scalar_tensor, tensor_meta


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """transformers' NewGELUActivation.forward (and minGPT's NewGELU), as written there."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _gelu_new_coef_tensor(x: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """gelu_new as torch.compile(dynamic=True) traces it: Dynamo lifts math.pi into a graph input, so
    the factor sqrt(2 / pi) is a 0-d tensor computed in the graph, multiplied in as a tensor."""
    return 0.5 * x * (1.0 + torch.tanh((x + 0.044715 * torch.pow(x, 3.0)) * coef))


QUICK_GELU_ALPHA = 1.702


def _activation(kind: str, x: torch.Tensor, coef: torch.Tensor | None = None) -> torch.Tensor:
    if kind == "silu":
        return F.silu(x)
    if kind == "quick_gelu":
        return x * torch.sigmoid(QUICK_GELU_ALPHA * x)
    if kind == "quick_gelu_sigmoid_first":
        return torch.sigmoid(QUICK_GELU_ALPHA * x) * x
    if kind == "silu_written":
        return x * torch.sigmoid(x)
    if kind == "silu_written_sigmoid_first":
        return torch.sigmoid(x) * x
    if kind == "gelu_new":
        return gelu_new(x) if coef is None else _gelu_new_coef_tensor(x, coef)
    if kind == "relu":
        return F.relu(x)
    if kind == "relu2":
        return F.relu(x) ** 2
    if kind == "relu2_mul":
        r = F.relu(x)
        return r * r
    return F.gelu(x, approximate="tanh" if kind == "gelu_tanh" else "none")


# gated activation kind -> (fused op, its arguments between gate, up and the quantize arguments)
GATED_OPS = {
    "silu": ("silu_and_mul_quantize", ()),
    "gelu": ("gelu_and_mul_quantize", ("none",)),
    "gelu_tanh": ("gelu_and_mul_quantize", ("tanh",)),
    "gelu_new": ("gelu_new_and_mul_quantize", ()),
    "relu": ("relu_and_mul_quantize", (False,)),
    "relu2": ("relu_and_mul_quantize", (True,)),
    "relu2_mul": ("relu_and_mul_quantize", (True,)),
}


def _coef_inputs(coef_tensor: bool) -> dict[str, torch.Tensor]:
    return {"coef": torch.empty((), dtype=torch.float32)} if coef_tensor else {}


def _coef_ok(match: pm.Match, x_name: str) -> bool:
    """The coefficient a coef_tensor rule binds acts as a scalar and lives where the op reads it."""
    coef, x = match.kwargs.get("coef"), tensor_meta(match, x_name)
    return scalar_tensor(coef) and coef.meta["val"].device.type in ("cpu", x.device.type)


def _coef_kwargs(coef) -> dict:
    return {} if coef is None else {"sqrt_2_over_pi": coef}


class ActivationAndMulQuantize(FusionPattern):
    """act(gate) * up (or up * act(gate) with `up_first`); `coef_tensor`: gelu_new with its factor a
    0-d tensor (see _gelu_new_coef_tensor)."""

    def __init__(self, kind: str, up_first: bool, coef_tensor: bool = False):
        self.kind = kind
        self.up_first = up_first
        self.coef_tensor = coef_tensor
        self.op_name, self.op_args = GATED_OPS[kind]
        self.name = f"{self.op_name}[{kind}{',coef_tensor' if coef_tensor else ''}{',up*act' if up_first else ''}]"

    def tensor_inputs(self, dtype, device):
        inputs = {n: torch.empty(8, 32, dtype=dtype, device=device) for n in ("gate", "up")}
        return {**inputs, **_coef_inputs(self.coef_tensor)}

    def pattern(self, gate, up, coef=None, global_scale=None):
        a = _activation(self.kind, gate, coef)
        return up * a if self.up_first else a * up

    def replacement(self, q: QuantizeArgs, gate, up, coef=None, global_scale=None):
        op = getattr(torch.ops.fp4op, self.op_name)
        return op(gate, up, *self.op_args, *q.tail(global_scale), **_coef_kwargs(coef))

    def check(self, match: pm.Match) -> bool:
        # same dtype and the same shape: a broadcasting multiply is not what the kernel computes; and up
        # not act(gate) itself (`r * r` of a ReLU is the squared-ReLU rule's, which leaves no ReLU behind)
        return (
            same_model_dtype(match, ["gate", "up"])
            and same_shape(tensor_meta(match, "gate"), tensor_meta(match, "up"))
            and match.kwargs["up"] not in match.nodes
            and (not self.coef_tensor or _coef_ok(match, "gate"))
        )


# plain activation kind -> (fused op, its arguments between x and the quantize arguments)
PLAIN_OPS = {
    "silu": ("silu_quantize", ()),
    "gelu": ("gelu_quantize", ("none",)),
    "gelu_tanh": ("gelu_quantize", ("tanh",)),
    "gelu_new": ("gelu_new_quantize", ()),
    "quick_gelu": ("sigmoid_mul_quantize", (QUICK_GELU_ALPHA,)),
    "quick_gelu_sigmoid_first": ("sigmoid_mul_quantize", (QUICK_GELU_ALPHA,)),
    "silu_written": ("sigmoid_mul_quantize", (1.0,)),
    "silu_written_sigmoid_first": ("sigmoid_mul_quantize", (1.0,)),
    "relu": ("relu_quantize", (False,)),
    "relu2": ("relu_quantize", (True,)),
    "relu2_mul": ("relu_quantize", (True,)),
}


class ActivationQuantize(FusionPattern):
    def __init__(self, kind: str, coef_tensor: bool = False):
        self.kind = kind
        self.coef_tensor = coef_tensor
        self.op_name, self.op_args = PLAIN_OPS[kind]
        self.name = f"{self.op_name}[{kind}{',coef_tensor' if coef_tensor else ''}]"

    def tensor_inputs(self, dtype, device):
        return {"x": torch.empty(8, 32, dtype=dtype, device=device), **_coef_inputs(self.coef_tensor)}

    def pattern(self, x, coef=None, global_scale=None):
        return _activation(self.kind, x, coef)

    def replacement(self, q: QuantizeArgs, x, coef=None, global_scale=None):
        op = getattr(torch.ops.fp4op, self.op_name)
        return op(x, *self.op_args, *q.tail(global_scale), **_coef_kwargs(coef))

    def check(self, match: pm.Match) -> bool:
        return same_model_dtype(match, ["x"]) and (not self.coef_tensor or _coef_ok(match, "x"))


def rules() -> list[FusionPattern]:
    """Gated rules first (they anchor at the same quantize as a plain rule would)."""
    gated = [ActivationAndMulQuantize(k, up_first) for k in GATED_OPS for up_first in (False, True)]
    gated += [ActivationAndMulQuantize("gelu_new", up_first, coef_tensor=True) for up_first in (False, True)]
    plain = [ActivationQuantize(k) for k in PLAIN_OPS] + [ActivationQuantize("gelu_new", coef_tensor=True)]
    return gated + plain
