"""RMSNorm -> quantize rules, with and without a residual add before the norm.

Source forms (each with and without a weight, any eps):

* ``"torch"``: ``F.rms_norm`` / ``nn.RMSNorm`` (weight applied in float32, one rounding);
* ``"hf"``: the Hugging Face LlamaRMSNorm form ``weight * (x.float() * rsqrt(var + eps)).to(dtype)``
  (the weight multiplies in the model dtype);
* ``"gemma"``: the Gemma form ``(x.float() * rsqrt(var + eps) * (1.0 + weight.float())).type_as(x)``;
* ``"meta"``: the reference Llama/Mistral code (and torchtune) form ``norm(x.float()).type_as(x) * weight``
  (the "hf" form with the weight on the right);
* ``"t5"``: the Hugging Face T5LayerNorm form ``weight * (x * rsqrt(var(x.float()) + eps)).to(weight.dtype)``
  (the bf16/fp16 x times the float32 rsqrt, the same roundings as "hf");
* ``"t5_right"``: the diffusers RMSNorm form ``(x * rsqrt(var(x.float()) + eps)).to(weight.dtype) * weight``
  ("t5" with the weight on the right); "t5" without a weight is diffusers' ``elementwise_affine=False``;
* ``"olmo2"``: the Hugging Face Olmo2RMSNorm / HeliumRMSNorm form
  ``(weight * (x.float() * rsqrt(var + eps))).to(dtype)`` (weight applied in float32, one rounding:
  the "torch" numerics in another graph);
* ``"glm"``: the ChatGLM form ``(weight * (x * rsqrt(var(x.float()) + eps))).to(dtype)`` (the "olmo2"
  numerics, x not converted first);
* ``"fp32_weight"``: the weight converted explicitly, ``(x.float() * rsqrt(var + eps) * weight.float()).to(dtype)``
  (LitGPT, google/gemma_pytorch without the unit offset: the "torch" numerics);
* ``"torch_fp32"``: ``F.rms_norm(x.float(), ..., weight.float(), eps).to(dtype)`` (the "torch" numerics; its
  eps add is another node than the manual forms').

The variance may be written ``h.pow(2).mean(-1, keepdim=True)`` or ``(h * h).mean(...)`` (gpt-fast, LitGPT):
the pass writes the product as the patterns do first (pass_manager.canonicalize_variances); a mean over the
last dim written as its index (``mean(2)`` of 3-D activations) becomes ``mean(-1)`` in a last round
(pass_manager.canonicalize_mean_dims).

F.rms_norm of a non-contiguous x (a transposed or permuted activation) decomposes with a contiguous
clone before its conversion back to the model dtype: the "torch" forms have rules traced with such an
x (`strided`), as the matcher re-traces a candidate with its real strides.

eps may also be a 0-d tensor graph input (a module's float eps under ``dynamic=True``): the fused ops'
``*_eps_tensor`` variants take it.

With `keep_normed`, the norm output also has readers other than the quantize (a post-norm residual
stream; after a residual add, an MoE block whose router gate is quantized and whose experts read the
rows): fp4op.rms_norm_quantize_with_normed / add_rms_norm_quantize_with_normed return it to them (not for
the float32-sum forms). Those rules apply only where such readers exist (elsewhere the plain rules do, and
the fused op does not store the output).

With `residual`, the norm's input is ``x + residual`` and that sum is also an output (the next
residual), which fp4op.add_rms_norm_quantize returns. vLLM's RMSNorm (nano-vllm and others alike) adds in
float32 instead: ``s = x.float() + residual.float()``, or ``x.float() + residual`` with the residual
promoted by the add (later vLLM versions; `promoted`), the next residual ``s.to(dtype)``, and ``s`` itself
normalized (`FLOAT32_SUM_FORMS`: ``h.to(dtype) * weight`` as vLLM,
``weight * h.to(dtype)``, ``(weight * h).to(dtype)``, or no weight): add_rms_norm_quantize with
``sum_in_float32=True``; also where the next residual is not used (vLLM's final norm,
``hidden_states, _ = self.norm(hidden_states, residual)``).

With `add_after`, the residual is added to the norm's output instead, ``residual + norm(x)`` (or ``norm(x)
+ residual``), and that sum is quantized and also returned (OLMo2's post-norm residual stream: ``h =
residual + post_attention_layernorm(attn)`` feeds the MLP's projections and the next residual add):
fp4op.rms_norm_add_quantize. These rules register with the `keep_normed` ones (graphs where a quantized
value has another reader).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch._inductor import pattern_matcher as pm

from .pass_manager import (
    FusionPattern,
    QuantizeArgs,
    quantized_value_read_elsewhere,
    same_model_dtype,
    same_shape,
    tensor_meta,
)

# float32-exact placeholder for eps (F.rms_norm's decomposition rounds eps to float32 on CPU)
EPS_PLACEHOLDER = 2.0**-17
FORMS = ("torch", "hf", "gemma", "meta", "t5", "t5_right", "olmo2", "glm", "fp32_weight", "torch_fp32")
# forms that exist only with a weight (without one, "gemma", "meta", "olmo2" and "fp32_weight" are the
# "hf" form, "t5_right" and "glm" the "t5" form, "torch_fp32" the "torch" form)
WEIGHT_ONLY_FORMS = ("gemma", "meta", "t5_right", "olmo2", "glm", "fp32_weight", "torch_fp32")
# forms whose weight multiplies in the model dtype (the fused ops' weight_in_input_dtype)
INPUT_DTYPE_WEIGHT_FORMS = ("hf", "meta", "t5", "t5_right")
# the weight forms written after a residual add in float32 (float32_sum_rms_norm_forms)
FLOAT32_SUM_FORMS = ("meta", "hf", "olmo2")
# the forms whose graph depends on x's strides (F.rms_norm's decomposition)
STRIDED_FORMS = ("torch", "torch_fp32")


def rms_norm_forms(x: torch.Tensor, weight: torch.Tensor | None, eps: float, form: str) -> torch.Tensor:
    """The RMSNorm of `x` written in one of the source `FORMS`."""
    if form == "torch":
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    if form == "torch_fp32":
        return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)
    if form in ("t5", "t5_right", "glm"):
        h = x * torch.rsqrt(x.to(torch.float32).pow(2).mean(-1, keepdim=True) + eps)
        if weight is None:
            return h.to(x.dtype)
        if form == "glm":
            return (weight * h).to(x.dtype)
        return weight * h.to(weight.dtype) if form == "t5" else h.to(weight.dtype) * weight
    return _normalize_float32(x.to(torch.float32), weight, eps, form, x)


def _normalize_float32(
    h: torch.Tensor, weight: torch.Tensor | None, eps: float, form: str, like: torch.Tensor
) -> torch.Tensor:
    """The forms that normalize a float32 `h` (x converted, or vLLM's float32 sum), weighted as `form`
    writes it and converted to the dtype of `like`."""
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if form == "hf":
        return h.to(like.dtype) if weight is None else weight * h.to(like.dtype)
    if form == "meta":
        return h.type_as(like) * weight
    if form == "olmo2":
        return (weight * h).to(like.dtype)
    if form == "fp32_weight":
        return (h * weight.float()).to(like.dtype)
    if weight is not None:
        h = h * (1.0 + weight.float())
    return h.type_as(like)


def float32_sum_rms_norm_forms(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float, form: str, promoted: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's residual RMSNorm: the sum in float32 (`promoted`: the residual converted by the add's type
    promotion, not by a cast), normalized as it is, weighted in one of the `FLOAT32_SUM_FORMS` (without a
    weight: "hf"); returns (output, next residual)."""
    s = x.to(torch.float32) + (residual if promoted else residual.to(torch.float32))
    return _normalize_float32(s, weight, eps, form, x), s.to(x.dtype)


class RMSNormQuantize(FusionPattern):
    scalars = {"eps": EPS_PLACEHOLDER}
    # dynamic=True passes a module's float eps as a 0-d tensor: the fused ops' *_eps_tensor variants take it
    tensor_scalars = ("eps",)

    def __init__(
        self,
        form: str,
        with_weight: bool,
        residual: bool,
        float32_sum: bool = False,
        sum_used: bool = True,
        strided: bool = False,
        promoted: bool = False,
        keep_normed: bool = False,
        add_after: bool = False,
        residual_left: bool = True,
    ):
        if form not in FORMS or (float32_sum and form not in FLOAT32_SUM_FORMS):
            raise ValueError(f"fp4op.fusion: unknown RMSNorm form {form!r}{' (float32 sum)' if float32_sum else ''}")
        if form in WEIGHT_ONLY_FORMS and not with_weight:
            raise ValueError(f"fp4op.fusion: the {form!r} RMSNorm form needs the weight (without one: the 'hf' form)")
        if float32_sum and not residual:
            raise ValueError("fp4op.fusion: a float32 sum needs the residual")
        if (not sum_used or promoted) and not float32_sum:
            raise ValueError("fp4op.fusion: an unused or promoted sum is a float32-sum form's")
        if strided and (form not in STRIDED_FORMS or residual):
            raise ValueError(f"fp4op.fusion: no strided-input rule for the {form!r} form{' with a residual' if residual else ''}")
        if keep_normed and (float32_sum or strided):
            raise ValueError("fp4op.fusion: a rule that keeps the norm output has no float32 sum and no strided x")
        if add_after and (not residual or float32_sum or strided or keep_normed):
            raise ValueError("fp4op.fusion: a residual added after the norm is a plain residual form's")
        self.form = form
        self.with_weight = with_weight
        self.residual = residual
        self.float32_sum = float32_sum
        self.sum_used = sum_used
        self.strided = strided
        self.promoted = promoted
        self.add_after = add_after
        self.residual_left = residual_left
        # registered with the rules that keep the norm output: the quantized sum has other readers (the
        # next residual add) wherever a model has this form
        self.keep_normed = keep_normed or add_after
        op = ("add_rms_norm_quantize" if residual else "rms_norm_quantize") + ("_with_normed" if keep_normed else "")
        self.op_name = "rms_norm_add_quantize" if add_after else op  # without _eps_tensor
        tags = ("float32_sum," if float32_sum else "") + ("promoted," if promoted else "") + form
        tags += "" if with_weight else ",no_weight"
        tags += ("" if sum_used else ",sum_unused") + (",strided" if strided else "")
        tags += "" if residual_left else ",residual_right"
        self.name = f"{self.op_name}[{tags}]"

    def tensor_inputs(self, dtype, device):
        # strided: a transposed x of the same shape
        x = torch.empty(32, 8, dtype=dtype, device=device)
        inputs = {"x": x.t() if self.strided else x.view(8, 32)}
        if self.residual:
            inputs["residual"] = torch.empty(8, 32, dtype=dtype, device=device)
        if self.with_weight:
            inputs["weight"] = torch.empty(32, dtype=dtype, device=device)
        return inputs

    def pattern(self, x, eps, weight=None, residual=None, global_scale=None):
        if self.add_after:
            out = rms_norm_forms(x, weight, eps, self.form)
            out = residual + out if self.residual_left else out + residual
            return out, out
        if self.float32_sum:
            out, total = float32_sum_rms_norm_forms(x, residual, weight, eps, self.form, self.promoted)
            return (out, total) if self.sum_used else out
        if self.residual:
            x = x + residual
            out = rms_norm_forms(x, weight, eps, self.form)
            return (out, x, out) if self.keep_normed else (out, x)
        out = rms_norm_forms(x, weight, eps, self.form)
        return (out, out) if self.keep_normed else out

    def replacement(self, q: QuantizeArgs, x, eps, weight=None, residual=None, global_scale=None):
        offset = 1.0 if self.form == "gemma" else 0.0
        in_dtype = self.form in INPUT_DTYPE_WEIGHT_FORMS and self.with_weight
        op = getattr(torch.ops.fp4op, self.op_name + ("_eps_tensor" if isinstance(eps, torch.Tensor) else ""))
        if self.float32_sum:
            out = op(x, residual, weight, eps, offset, in_dtype, *q.tail(global_scale), sum_in_float32=True)
            return out if self.sum_used else out[:2]
        if self.residual:
            return op(x, residual, weight, eps, offset, in_dtype, *q.tail(global_scale))
        return op(x, weight, eps, offset, in_dtype, *q.tail(global_scale))

    def check(self, match: pm.Match) -> bool:
        names = ["x"] + (["residual"] if self.residual else []) + (["weight"] if self.with_weight else [])
        if not same_model_dtype(match, names):
            return False
        x = tensor_meta(match, "x")
        if x.dim() < 1:
            return False
        if self.residual and not same_shape(tensor_meta(match, "residual"), x):
            return False
        if self.with_weight and not same_shape(tensor_meta(match, "weight"), (x.shape[-1],)):
            return False
        # the plain rule where the norm output has no other reader (the fused op would store it for nothing);
        # a sum added after the norm is stored either way (the unfused graph's norm kernel stores it too)
        return self.add_after or not self.keep_normed or quantized_value_read_elsewhere(match)


def rules() -> list[FusionPattern]:
    """Residual forms first: they anchor at the same quantize and cover more of the graph."""
    float32_sum = [
        RMSNormQuantize(form, with_weight, True, float32_sum=True, sum_used=sum_used, promoted=promoted)
        for promoted in (False, True)
        for sum_used in (True, False)
        for form in FLOAT32_SUM_FORMS
        for with_weight in (True, False)
        if with_weight or form == "hf"
    ]
    strided = [
        RMSNormQuantize(form, with_weight, False, strided=True)
        for form in STRIDED_FORMS
        for with_weight in (True, False)
        if with_weight or form not in WEIGHT_ONLY_FORMS
    ]
    kept = [
        RMSNormQuantize(form, with_weight, residual, keep_normed=True)
        for residual in (True, False)
        for form in FORMS
        for with_weight in (True, False)
        if with_weight or form not in WEIGHT_ONLY_FORMS
    ]
    # OLMo2's post-norm residual stream, `residual + norm(x)` quantized (the sum also the next residual)
    post_norm = [
        RMSNormQuantize(form, with_weight, True, add_after=True, residual_left=left)
        for left in (True, False)
        for form in FORMS
        for with_weight in (True, False)
        if with_weight or form not in WEIGHT_ONLY_FORMS
    ]
    return float32_sum + [
        RMSNormQuantize(form, with_weight, residual)
        for residual in (True, False)
        for form in FORMS
        for with_weight in (True, False)
        if with_weight or form not in WEIGHT_ONLY_FORMS
    ] + strided + kept + post_norm
