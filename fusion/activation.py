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
  eager does;
* ``F.relu(x)`` / ``nn.ReLU`` (OPT, T5 v1.0) and the squared ReLU ``F.relu(x) ** 2`` (also
  ``.pow(2)``, ``torch.square``, ``r * r``; Primer, Nemotron, modded-nanogpt) -> fp4op.relu_quantize.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch._inductor import pattern_matcher as pm

from .pass_manager import FusionPattern, QuantizeArgs, same_model_dtype, same_shape, tensor_meta



def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """transformers' NewGELUActivation.forward (and minGPT's NewGELU), as written there."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _activation(kind: str, x: torch.Tensor) -> torch.Tensor:
    if kind == "silu":
        return F.silu(x)
    if kind == "gelu_new":
        return gelu_new(x)
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


class ActivationAndMulQuantize(FusionPattern):
    """act(gate) * up (or up * act(gate) with `up_first`)."""

    def __init__(self, kind: str, up_first: bool):
        self.kind = kind
        self.up_first = up_first
        self.op_name, self.op_args = GATED_OPS[kind]
        self.name = f"{self.op_name}[{kind}{',up*act' if up_first else ''}]"

    def tensor_inputs(self, dtype, device):
        return {n: torch.empty(8, 32, dtype=dtype, device=device) for n in ("gate", "up")}

    def pattern(self, gate, up, global_scale=None):
        a = _activation(self.kind, gate)
        return up * a if self.up_first else a * up

    def replacement(self, q: QuantizeArgs, gate, up, global_scale=None):
        return getattr(torch.ops.fp4op, self.op_name)(gate, up, *self.op_args, *q.tail(global_scale))

    def check(self, match: pm.Match) -> bool:
        # same dtype and the same shape: a broadcasting multiply is not what the kernel computes; and up
        # not act(gate) itself (`r * r` of a ReLU is the squared-ReLU rule's, which leaves no ReLU behind)
        return (
            same_model_dtype(match, ["gate", "up"])
            and same_shape(tensor_meta(match, "gate"), tensor_meta(match, "up"))
            and match.kwargs["up"] not in match.nodes
        )


# plain activation kind -> (fused op, its arguments between x and the quantize arguments)
PLAIN_OPS = {
    "silu": ("silu_quantize", ()),
    "gelu": ("gelu_quantize", ("none",)),
    "gelu_tanh": ("gelu_quantize", ("tanh",)),
    "gelu_new": ("gelu_new_quantize", ()),
    "relu": ("relu_quantize", (False,)),
    "relu2": ("relu_quantize", (True,)),
    "relu2_mul": ("relu_quantize", (True,)),
}


class ActivationQuantize(FusionPattern):
    def __init__(self, kind: str):
        self.kind = kind
        self.op_name, self.op_args = PLAIN_OPS[kind]
        self.name = f"{self.op_name}[{kind}]"

    def tensor_inputs(self, dtype, device):
        return {"x": torch.empty(8, 32, dtype=dtype, device=device)}

    def pattern(self, x, global_scale=None):
        return _activation(self.kind, x)

    def replacement(self, q: QuantizeArgs, x, global_scale=None):
        return getattr(torch.ops.fp4op, self.op_name)(x, *self.op_args, *q.tail(global_scale))

    def check(self, match: pm.Match) -> bool:
        return same_model_dtype(match, ["x"])


def rules() -> list[FusionPattern]:
    """Gated rules first (they anchor at the same quantize as a plain rule would)."""
    gated = [ActivationAndMulQuantize(k, up_first) for k in GATED_OPS for up_first in (False, True)]
    return [*gated, *(ActivationQuantize(k) for k in PLAIN_OPS)]
