"""LayerNorm -> quantize rules: F.layer_norm / nn.LayerNorm over the last dim with weight and bias,
weight only (``nn.LayerNorm(bias=False)``) or neither (``elementwise_affine=False``), any eps; also
computed in float32 from the model-dtype input and parameters and converted back
(``F.layer_norm(x.float(), shape, w.float(), b.float(), eps).type_as(x)``, as fairseq and open_clip
write it): torch's float32 kernel evaluates the bf16/fp16 one's formula on the same float32 values; only
the row statistics are computed differently (rows with a large mean and a small spread can round apart
from the bf16 kernel's, as the bf16 rule's fused op does; without weight and bias the graphs are the same).

Each form also where the norm output has readers besides the quantize (`keep_normed`: post-LN residual
streams): fp4op.layer_norm_quantize_with_normed returns the output to them.

The adaLN modulation of diffusion transformers, ``norm(x) * (1 + scale[:, None]) + shift[:, None]``
(DiT, PixArt, SD3 and FLUX in diffusers), factors in either order, the shift on either side: ->
fp4op.layer_norm_modulate_quantize, with the multiplier (``1 + scale``, left to the graph) and the shift
broadcast per sample ([B, 1, K] for x [B, T, K], or one [K] vector)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch._inductor import pattern_matcher as pm

from ..fused_ops import broadcasts_per_sample

from .pass_manager import (
    FusionPattern,
    QuantizeArgs,
    quantized_value_read_elsewhere,
    same_model_dtype,
    same_shape,
    tensor_meta,
)

EPS_PLACEHOLDER = 2.0**-17  # float32-exact


def affine_label(with_weight: bool, with_bias: bool) -> str:
    return "weight,bias" if with_bias else "weight" if with_weight else "no_affine"


def with_affine(inputs: dict, with_weight: bool, with_bias: bool, dtype, device) -> dict:
    """`inputs` and the rule's LayerNorm weight and bias (of the pattern's K = 32)."""
    if with_weight:
        inputs["weight"] = torch.empty(32, dtype=dtype, device=device)
    if with_bias:
        inputs["bias"] = torch.empty(32, dtype=dtype, device=device)
    return inputs


class LayerNormQuantize(FusionPattern):
    scalars = {"eps": EPS_PLACEHOLDER}

    def __init__(self, with_weight: bool, with_bias: bool, float32: bool = False, keep_normed: bool = False):
        if with_bias and not with_weight:
            raise ValueError("fp4op.fusion: a LayerNorm rule with bias needs the weight")
        if float32 and not with_weight:
            raise ValueError("fp4op.fusion: without weight and bias the float32 LayerNorm is the plain rule")
        self.with_weight = with_weight
        self.with_bias = with_bias
        self.float32 = float32
        self.keep_normed = keep_normed
        op = "layer_norm_quantize_with_normed" if keep_normed else "layer_norm_quantize"
        self.name = f"{op}[{affine_label(with_weight, with_bias)}{',float32' if float32 else ''}]"

    def tensor_inputs(self, dtype, device):
        inputs = {"x": torch.empty(8, 32, dtype=dtype, device=device)}
        return with_affine(inputs, self.with_weight, self.with_bias, dtype, device)

    def pattern(self, x, eps, weight=None, bias=None, global_scale=None):
        if self.float32:
            f32 = torch.float32
            bias = None if bias is None else bias.to(f32)
            out = F.layer_norm(x.to(f32), (x.shape[-1],), weight.to(f32), bias, eps).to(x.dtype)
        else:
            out = F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
        return (out, out) if self.keep_normed else out

    def replacement(self, q: QuantizeArgs, x, eps, weight=None, bias=None, global_scale=None):
        op = torch.ops.fp4op.layer_norm_quantize_with_normed if self.keep_normed else torch.ops.fp4op.layer_norm_quantize
        return op(x, weight, bias, eps, *q.tail(global_scale))

    def check(self, match: pm.Match) -> bool:
        names = ["x"] + (["weight"] if self.with_weight else []) + (["bias"] if self.with_bias else [])
        if not same_model_dtype(match, names):
            return False
        x = tensor_meta(match, "x")
        if not all(same_shape(tensor_meta(match, n), (x.shape[-1],)) for n in names[1:]):
            return False
        # the plain rule where the norm output has no other reader (the fused op would store it for nothing)
        return not self.keep_normed or quantized_value_read_elsewhere(match)


def per_sample(t: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether t broadcasts to x per sample, as layer_norm_modulate_quantize takes it; a size not known to
    be 1 (a symbol) must be x's there."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return broadcasts_per_sample(t.shape, x.shape, lambda a, b: statically_known_true(a == b))


class LayerNormModulateQuantize(FusionPattern):
    """``norm(x) * multiplier + shift`` (adaLN) -> fp4op.layer_norm_modulate_quantize."""

    scalars = {"eps": EPS_PLACEHOLDER}

    def __init__(self, with_weight: bool, with_bias: bool, multiplier_first: bool, shift_first: bool):
        self.with_weight = with_weight
        self.with_bias = with_bias
        self.multiplier_first = multiplier_first
        self.shift_first = shift_first
        product = "multiplier*norm" if multiplier_first else "norm*multiplier"
        modulation = f"shift+{product}" if shift_first else f"{product}+shift"
        self.name = f"layer_norm_modulate_quantize[{affine_label(with_weight, with_bias)},{modulation}]"

    def tensor_inputs(self, dtype, device):
        inputs = {
            "x": torch.empty(2, 4, 32, dtype=dtype, device=device),
            "multiplier": torch.empty(2, 1, 32, dtype=dtype, device=device),
            "shift": torch.empty(2, 1, 32, dtype=dtype, device=device),
        }
        return with_affine(inputs, self.with_weight, self.with_bias, dtype, device)

    def pattern(self, x, multiplier, shift, eps, weight=None, bias=None, global_scale=None):
        normed = F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
        scaled = multiplier * normed if self.multiplier_first else normed * multiplier
        return shift + scaled if self.shift_first else scaled + shift

    def replacement(self, q: QuantizeArgs, x, multiplier, shift, eps, weight=None, bias=None, global_scale=None):
        return torch.ops.fp4op.layer_norm_modulate_quantize(x, weight, bias, eps, multiplier, shift, *q.tail(global_scale))

    def check(self, match: pm.Match) -> bool:
        names = ["x", "multiplier", "shift"] + (["weight"] if self.with_weight else []) + (["bias"] if self.with_bias else [])
        if not same_model_dtype(match, names):
            return False
        x = tensor_meta(match, "x")
        if not all(same_shape(tensor_meta(match, n), (x.shape[-1],)) for n in names[3:]):
            return False
        # the modulated value must have x's shape, its operands one row a sample (not a position's row)
        return all(per_sample(tensor_meta(match, n), x) for n in ("multiplier", "shift"))


def rules() -> list[FusionPattern]:
    """The plain rules, those that also return the norm output (post-LN models: BERT, BART,
    nn.TransformerEncoderLayer's default norm_first=False, where the output is the next residual too), and
    the adaLN rules."""
    plain = [
        LayerNormQuantize(with_weight, with_bias, float32, keep_normed)
        for keep_normed in (False, True)
        for with_weight, with_bias, float32 in (
            (True, True, False),
            (True, False, False),
            (False, False, False),
            (True, True, True),
            (True, False, True),
        )
    ]
    modulated = [
        LayerNormModulateQuantize(with_weight, with_bias, multiplier_first, shift_first)
        for with_weight, with_bias in ((False, False), (True, True), (True, False))
        for multiplier_first in (False, True)
        for shift_first in (False, True)
    ]
    return plain + modulated
