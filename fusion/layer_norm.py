"""LayerNorm -> quantize rules: F.layer_norm / nn.LayerNorm over the last dim with weight and bias,
weight only (``nn.LayerNorm(bias=False)``) or neither (``elementwise_affine=False``), any eps; also
computed in float32 from the model-dtype input and parameters and converted back
(``F.layer_norm(x.float(), shape, w.float(), b.float(), eps).type_as(x)``, as fairseq and open_clip
write it): torch's float32 kernel evaluates the bf16/fp16 one's formula on the same float32 values; only
the row statistics are computed differently (rows with a large mean and a small spread can round apart
from the bf16 kernel's, as the bf16 rule's fused op does; without weight and bias the graphs are the same)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch._inductor import pattern_matcher as pm

from .pass_manager import FusionPattern, QuantizeArgs, same_model_dtype, same_shape, tensor_meta

EPS_PLACEHOLDER = 2.0**-17  # float32-exact


class LayerNormQuantize(FusionPattern):
    scalars = {"eps": EPS_PLACEHOLDER}

    def __init__(self, with_weight: bool, with_bias: bool, float32: bool = False):
        if with_bias and not with_weight:
            raise ValueError("fp4op.fusion: a LayerNorm rule with bias needs the weight")
        if float32 and not with_weight:
            raise ValueError("fp4op.fusion: without weight and bias the float32 LayerNorm is the plain rule")
        self.with_weight = with_weight
        self.with_bias = with_bias
        self.float32 = float32
        affine = "weight,bias" if with_bias else "weight" if with_weight else "no_affine"
        self.name = f"layer_norm_quantize[{affine}{',float32' if float32 else ''}]"

    def tensor_inputs(self, dtype, device):
        inputs = {"x": torch.empty(8, 32, dtype=dtype, device=device)}
        if self.with_weight:
            inputs["weight"] = torch.empty(32, dtype=dtype, device=device)
        if self.with_bias:
            inputs["bias"] = torch.empty(32, dtype=dtype, device=device)
        return inputs

    def pattern(self, x, eps, weight=None, bias=None, global_scale=None):
        if self.float32:
            f32 = torch.float32
            bias = None if bias is None else bias.to(f32)
            return F.layer_norm(x.to(f32), (x.shape[-1],), weight.to(f32), bias, eps).to(x.dtype)
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)

    def replacement(self, q: QuantizeArgs, x, eps, weight=None, bias=None, global_scale=None):
        return torch.ops.fp4op.layer_norm_quantize(x, weight, bias, eps, *q.tail(global_scale))

    def check(self, match: pm.Match) -> bool:
        names = ["x"] + (["weight"] if self.with_weight else []) + (["bias"] if self.with_bias else [])
        if not same_model_dtype(match, names):
            return False
        x = tensor_meta(match, "x")
        return all(same_shape(tensor_meta(match, n), (x.shape[-1],)) for n in names[1:])


def rules() -> list[FusionPattern]:
    return [
        LayerNormQuantize(True, True),
        LayerNormQuantize(True, False),
        LayerNormQuantize(False, False),
        LayerNormQuantize(True, True, float32=True),
        LayerNormQuantize(True, False, float32=True),
    ]
