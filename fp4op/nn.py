"""FP4 linear layers: `FP4Linear` and `convert` (swap a model's nn.Linear layers).

Weights are quantized once, at conversion, and stored as buffers (codes, 128x4-swizzled scale
factors, and for NVFP4 the per-tensor global scale). Activations are quantized on every call with
``torch.ops.fp4op.quantize``, so under ``torch.compile`` with ``fp4op.fusion`` enabled the quantize
fuses with the norm or activation that produces the layer's input.

Activation global scale (NVFP4 only; MXFP4 has none):

* ``"static"`` (default): one calibrated per-tensor scale, ``448 * 6 / amax``, with amax recorded
  over sample batches inside ``with fp4op.nn.calibrate(model): model(batch)`` (or set with
  `FP4Linear.set_input_amax`, e.g. from a checkpoint, as vLLM does). The quantize input then has no
  other user, so the norm/activation -> quantize chain fuses. Until a layer is calibrated it uses the
  dynamic scale below (correct, but that chain is not fused).
* ``"dynamic"``: ``448 * 6 / amax(x)`` computed from every input. The amax is a second user of the
  quantize input, so a norm/activation producing it is not fused with the quantize (its output must be
  materialized for the amax anyway).

Matmul:

* ``"scaled_mm"``: ``torch._scaled_mm`` on the FP4 operands and their swizzled scales (GPUs of compute
  capability 10.0 and up), the global scales applied to the output;
* ``"emulated"``: dequantize both operands to the input dtype (``fp4op.dequantize``) and
  ``F.linear`` -- the same products up to the rounding of the dequantized values to the model dtype;
* ``"auto"`` (default): scaled_mm where the device supports it and the shapes fit its rules
  (in_features % 32 == 0, out_features % 16 == 0), emulated elsewhere.

FP4Linear's FP4 weight and bias are frozen buffers. With grad enabled, an input that requires grad gets
the gradient of x @ W^T, W the dequantized weight (the activation quantize taken as the identity, a
straight-through estimator), so adapters (LoRA) before or beside FP4 layers train as on QLoRA-style
4-bit bases.

Calibration (`calibrate`) records the largest finite input magnitude of each layer (NaN/inf elements
and empty inputs are skipped) and ties sibling layers that read the very same tensor object.

NaN inputs quantize as SPEC.md says (to the largest code of their block): with a static or MXFP4 scale a
NaN element comes out finite; with the dynamic scale its NaN amax makes the whole output NaN.
"""

from __future__ import annotations

import contextlib
import fnmatch
import itertools
import warnings
from typing import Iterable, Iterator, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from . import api, layouts

RECIPES = {"nvfp4": (16, False), "mxfp4": (32, True)}
ACTIVATION_SCALES = ("static", "dynamic")
MATMULS = ("auto", "scaled_mm", "emulated")
_FP4_MAX_TIMES_E4M3_MAX = 448.0 * 6.0
_MODEL_DTYPES = (torch.float16, torch.bfloat16)


def _check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"fp4op.nn: {name} must be one of {tuple(choices)}, got {value!r}")


def scaled_mm_supported(device: torch.device) -> bool:
    """torch._scaled_mm takes FP4 operands with block scales on CUDA GPUs of capability 10.0+."""
    return (
        device.type == "cuda"
        and hasattr(torch, "float4_e2m1fn_x2")
        and torch.cuda.get_device_capability(device) >= (10, 0)
    )


def _autocast_input(x: torch.Tensor) -> torch.Tensor:
    """The input nn.Linear computes with under torch.autocast: a floating-point input (float32 from a
    norm that autocast runs in float32, say) cast to the autocast dtype, as F.linear's autocast kernel
    casts it. Unchanged outside autocast, or where its dtype is not one FP4Linear computes in."""
    device_type = x.device.type
    # the devices fp4op runs on (torch.is_autocast_enabled raises for "meta"; torch.amp's
    # is_autocast_available would break torch 2.11's Dynamo graph, and the fusion with it)
    autocast = device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type)
    if autocast and x.dtype in (torch.float32, *_MODEL_DTYPES):
        dtype = torch.get_autocast_dtype(device_type)
        if dtype in _MODEL_DTYPES:
            return x.to(dtype)
    return x


def _dequantize_swizzled(q, sf, gs, sf_vec_size: int, sf_use_ue8m0: bool, dtype: torch.dtype) -> torch.Tensor:
    """An FP4Linear operand (codes, 128x4-swizzled scales, NVFP4 global scale) dequantized to `dtype`."""
    return torch.ops.fp4op.dequantize(q, sf, gs, sf_vec_size, sf_use_ue8m0, True, False, False, dtype)


class _StraightThroughInput(torch.autograd.Function):
    """`out` (the layer's output, computed without gradient) with the input gradient of x @ W^T, W the
    dequantized weight: the activation quantize taken as the identity (a straight-through estimator),
    as 4-bit base layers are trained through in QLoRA-style adapter training. The FP4 weight and the
    bias are buffers: no gradient. W is dequantized again in the backward rather than kept. The output
    is a new tensor, not a view of `out` (a Function's view output could not be modified in place:
    ReLU(inplace=True), ``y += r``), and the setup_context form serves torch.func (grad, vmap)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, out, weight_q, weight_sf, weight_global_scale, sf_vec_size, sf_use_ue8m0, dtype):
        return out.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, _, weight_q, weight_sf, weight_global_scale, sf_vec_size, sf_use_ue8m0, dtype = inputs
        ctx.save_for_backward(weight_q, weight_sf, weight_global_scale)
        ctx.recipe = (sf_vec_size, sf_use_ue8m0, dtype, x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        weight_q, weight_sf, weight_global_scale = ctx.saved_tensors
        sf_vec_size, sf_use_ue8m0, dtype, x_dtype = ctx.recipe
        weight = _dequantize_swizzled(weight_q, weight_sf, weight_global_scale, sf_vec_size, sf_use_ue8m0, dtype)
        return (grad_out.to(dtype) @ weight).to(x_dtype), None, None, None, None, None, None, None


# A model-wide move of calibrate()'s shared scale tensor: the first sibling layer's `_apply` moves it,
# the others get that same moved tensor (one scale object, so their identical quantizes still merge).
# Keyed on the original tensor, for the one `_apply` function (a `.to()` call) that moved it.
_MOVED_BUFFERS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _moved_as_bytes(t: torch.Tensor, fn) -> torch.Tensor:
    """`fn` (a model-wide `_apply` function) applied to `t` as raw bytes: moved (device, memory
    sharing), never converted (.half(), .type(torch.float16))."""
    memo = _MOVED_BUFFERS.get(t)
    if memo is not None and memo[0] is fn:
        return memo[1]
    raw = t.view(torch.uint8)
    moved = fn(raw)
    if moved.dtype != torch.uint8 or moved.shape != raw.shape:
        moved = raw.to(moved.device)
    moved = moved.view(t.dtype)
    _MOVED_BUFFERS[t] = (fn, moved)
    return moved


class FP4Linear(nn.Module):
    """y = x @ W^T + b with W stored in FP4 (NVFP4 or MXFP4) and x quantized per call.

    Build it from an nn.Linear with `FP4Linear.from_linear` (or `convert` a whole model). Inputs are
    ``[..., in_features]``: float16/bfloat16 are quantized as they are; float32/float64 are cast to the
    layer's `dtype` first (the output cast back); under torch.autocast a float32/float16/bfloat16 input
    is cast to the autocast dtype, as nn.Linear's is. The output has the (cast) input's dtype.

    Model-wide casts (``model.half()``, ``.to(torch.bfloat16)``) change the layer's `dtype` and bias;
    the float32 global scales move with the model but keep their bits. The FP4 weight is frozen (a
    buffer); with grad enabled an input that requires grad gets the gradient of x @ W^T with W the
    dequantized weight (the activation quantize taken as the identity: `_StraightThroughInput`).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        recipe: str = "nvfp4",
        activation_scale: str = "static",
        matmul: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.bfloat16,
    ):
        super().__init__()
        _check_choice("recipe", recipe, RECIPES)
        _check_choice("activation_scale", activation_scale, ACTIVATION_SCALES)
        _check_choice("matmul", matmul, MATMULS)
        if dtype not in _MODEL_DTYPES:
            raise ValueError(f"fp4op.nn: dtype must be float16 or bfloat16, got {dtype}")
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"fp4op.nn: {name} must be a non-negative int, got {value!r}")
        self.sf_vec_size, self.sf_use_ue8m0 = RECIPES[recipe]
        if in_features == 0 or in_features % self.sf_vec_size:
            raise ValueError(
                f"fp4op.nn: in_features ({in_features}) must be a positive multiple of the {recipe} block "
                f"size {self.sf_vec_size}"
            )
        self.in_features, self.out_features = in_features, out_features
        self.recipe, self.activation_scale, self.matmul = recipe, activation_scale, matmul
        self.dtype = dtype
        sf_shape = layouts.sf_shape(out_features, in_features // self.sf_vec_size, layouts.SWIZZLED_128x4)
        self.register_buffer("weight_q", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("weight_sf", torch.zeros(sf_shape, dtype=torch.uint8, device=device))
        gs = None if self.sf_use_ue8m0 else torch.ones(1, dtype=torch.float32, device=device)
        self.register_buffer("weight_global_scale", gs)
        # static activation scale: 0 means "not calibrated yet"
        static = None if self.sf_use_ue8m0 or activation_scale != "static" else torch.zeros(1, device=device)
        self.register_buffer("input_global_scale", static)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self._calibrated = False
        self._scale_tied = False  # input_global_scale shared with sibling layers (calibrate)
        # converted from transformers' Conv1D: the checkpoints _load_from_state_dict quantizes store the
        # weight [in_features, out_features]
        self._checkpoint_weight_transposed = False
        self._reset_calibration_state()

    def _reset_calibration_state(self) -> None:
        self._calibrating: _CalibrationPass | None = None
        self._observed_amax: torch.Tensor | None = None
        self._observed_inputs: list[tuple] = []

    def __getstate__(self):
        # a copy (deepcopy, pickle) made inside `calibrate` is not part of that pass
        state = self.__dict__.copy()
        state.update(_calibrating=None, _observed_amax=None, _observed_inputs=[])
        return state

    # ---- construction ------------------------------------------------------------------------------

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        recipe: str = "nvfp4",
        activation_scale: str = "static",
        matmul: str = "auto",
        dtype: torch.dtype | None = None,
    ) -> "FP4Linear":
        """Quantize `linear`'s weight (in `dtype`, default the weight's dtype, float32 weights become
        bfloat16) and copy its bias. `linear`: an nn.Linear, or transformers' Conv1D (GPT-2)."""
        if not isinstance(linear, (nn.Linear, _LinearView)):
            view = _linear_view(linear)
            if view is None:
                raise TypeError(
                    f"fp4op.nn: FP4Linear.from_linear takes an nn.Linear or transformers' Conv1D, got {type(linear).__name__}"
                )
            linear = view
        w = linear.weight.detach()
        dtype = dtype or (w.dtype if w.dtype in _MODEL_DTYPES else torch.bfloat16)
        layer = cls(
            linear.in_features, linear.out_features, linear.bias is not None, recipe, activation_scale, matmul,
            device=w.device, dtype=dtype,
        )
        layer.set_weight(w.to(dtype))
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach().to(dtype))
        layer._checkpoint_weight_transposed = getattr(linear, "checkpoint_weight_transposed", False)
        return layer

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        """Quantize `weight` [out_features, in_features] into the buffers (NVFP4: per-tensor global scale
        448 * 6 / amax(weight))."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"fp4op.nn: weight must have shape {(self.out_features, self.in_features)}, got {tuple(weight.shape)}")
        w_q, w_sf, gs = self._quantized_weight(weight)
        self.weight_q.copy_(w_q)
        self.weight_sf.copy_(w_sf)
        if gs is not None:
            self.weight_global_scale.copy_(gs)

    @torch.no_grad()
    def _quantized_weight(self, weight: torch.Tensor, device: torch.device | None = None):
        """(codes, 128x4 scale factors, NVFP4 global scale or None) of `weight` in the layer's dtype, on
        `device` (default the layer's)."""
        if not weight.dtype.is_floating_point or weight.dtype == getattr(torch, "float4_e2m1fn_x2", None):
            raise ValueError(f"fp4op.nn: weight must be a floating-point tensor, got {weight.dtype}")
        weight = weight.detach().to(device or self.weight_q.device, self.dtype).contiguous()
        if weight.device.type != "meta" and not bool(torch.isfinite(weight).all()):
            # NVFP4: the global scale 448 * 6 / amax would be 0 or NaN, every output non-finite
            raise ValueError("fp4op.nn: the weight has infinite or NaN elements (after the cast to the layer's dtype)")
        gs = None if self.sf_use_ue8m0 else api.nvfp4_global_scale(weight)
        w_q, w_sf = torch.ops.fp4op.quantize(weight, gs, self.sf_vec_size, self.sf_use_ue8m0)
        return w_q, w_sf, gs

    @torch.no_grad()
    def set_input_amax(self, amax: torch.Tensor | float) -> None:
        """Fix the static activation scale to 448 * 6 / amax (NVFP4, activation_scale='static')."""
        if self.input_global_scale is None:
            raise ValueError("fp4op.nn: set_input_amax needs recipe='nvfp4' and activation_scale='static'")
        amax = torch.as_tensor(amax, dtype=torch.float32, device=self.input_global_scale.device).reshape(1)
        if not _usable_amax(amax):
            # the scale 448 * 6 / amax would be infinite, zero, negative or NaN: every later output garbage
            raise ValueError(f"fp4op.nn: the input amax must be finite and positive, got {amax.item()}")
        self._untie_scale()  # this layer's scale alone, not its siblings'
        self._set_input_scale(amax)

    def _set_input_scale(self, amax: torch.Tensor) -> None:
        self.input_global_scale.copy_(_FP4_MAX_TIMES_E4M3_MAX / amax)
        self._calibrated = True

    def _untie_scale(self) -> None:
        if getattr(self, "_scale_tied", False):  # (absent in modules pickled before it)
            self.input_global_scale = self.input_global_scale.clone()
            self._scale_tied = False

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        key = prefix + "input_global_scale"
        if getattr(self, "_scale_tied", False) and key in destination:
            # each layer's own tensor: savers that refuse shared storage (safetensors) and loaders that
            # keep one of several aliased keys see separate values
            destination[key] = destination[key].clone()

    def _apply(self, fn, recurse=True):
        # The codes, block scales and float32 global scales are bytes of a format: a model-wide cast
        # (.half(), .to(torch.bfloat16), .type()) would convert them (an fp16 448 * 6 / amax overflows
        # for amax < 0.041: weights dequantized to zero). They go through `fn` as raw bytes, moved only.
        byte_buffers = {}
        for name in ("weight_q", "weight_sf", "weight_global_scale", "input_global_scale"):
            if self._buffers.get(name) is not None:
                byte_buffers[name] = self._buffers[name]
                self._buffers[name] = None  # skipped by nn.Module._apply
        try:
            super()._apply(fn, recurse)
            moved = {name: _moved_as_bytes(t, fn) for name, t in byte_buffers.items()}
        except BaseException:
            self._buffers.update(byte_buffers)
            raise
        self._buffers.update(moved)
        # the model dtype follows the cast, as the bias does (a cast to float32 keeps the layer's)
        if self.bias is not None:
            dtype = self.bias.dtype
        else:
            try:
                dtype = fn(torch.empty(0, dtype=self.dtype, device=self.weight_q.device)).dtype
            except Exception:  # a function meant for the module's own tensors only
                dtype = self.dtype
        if dtype in _MODEL_DTYPES:
            self.dtype = dtype
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "input_global_scale"
        if prefix + "weight" in state_dict and prefix + "weight_q" not in state_dict:
            # an nn.Linear's checkpoint (the model converted before its weights were loaded): its weight
            # quantized into this layer's buffers, where the layer lives or, for a meta layer loaded with
            # assign=True, where the checkpoint does; the static scale "not calibrated" (dynamic until
            # calibrated: these inputs are not the ones any earlier calibration saw)
            weight = state_dict.pop(prefix + "weight")
            device = weight.device if self.weight_q.device.type == "meta" else self.weight_q.device
            stored = (self.out_features, self.in_features)
            if self._checkpoint_weight_transposed:
                stored = stored[::-1]
            quantized, problem = None, None
            if tuple(weight.shape) != stored:
                problem = (
                    f"size mismatch for {prefix}weight: copying a param with shape {weight.shape} from checkpoint, "
                    f"the shape in current model is {torch.Size(stored)}."
                )
            else:
                try:
                    quantized = self._quantized_weight(weight.t() if self._checkpoint_weight_transposed else weight, device)
                except ValueError as err:
                    problem = f"While quantizing {prefix}weight: {err}"
            if problem is not None:
                # reported with torch's other loading errors; the layer's own values stand in for the
                # quantized weight (no key reported missing, nothing changed)
                error_msgs.append(problem)
                quantized = (self.weight_q, self.weight_sf, self.weight_global_scale)
                if self.input_global_scale is not None:
                    state_dict[key] = self.input_global_scale
            elif self.input_global_scale is not None:
                state_dict[key] = torch.zeros(1, device=device)
            for name, value in zip(("weight_q", "weight_sf", "weight_global_scale"), quantized):
                if value is not None:
                    state_dict[prefix + name] = value
        if key in state_dict:
            # calibrate() tied this buffer to its siblings' (one tensor): loading copies into it, so
            # each layer's value would overwrite the others'. The checkpoint's value is this layer's own.
            self._untie_scale()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if self.input_global_scale is not None and key in state_dict:
            scale = self.input_global_scale
            self._calibrated = bool(scale.device.type != "meta" and _usable_amax(scale))

    @property
    def weight(self) -> torch.Tensor:
        """The weight this layer computes with: the FP4 weight dequantized to `dtype`, [out_features,
        in_features], a new tensor at each access (in-place edits of it change nothing: assign instead).
        Model code that reads ``linear.weight.dtype`` or ``.device`` (Hugging Face T5 casts its input to
        ``wo.weight.dtype``) keeps working; assigning a tensor to ``weight`` quantizes it (`set_weight`)."""
        return self._dequantize(self.weight_q, self.weight_sf, self.weight_global_scale, self.dtype)

    def __setattr__(self, name: str, value) -> None:
        if name == "weight":  # before nn.Module's, which would register a Parameter the forward never reads
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"fp4op.nn.FP4Linear: weight must be a tensor, got {type(value).__name__}")
            self.set_weight(value.detach())
            return
        super().__setattr__(name, value)

    # ---- forward -----------------------------------------------------------------------------------

    def _input_global_scale(self, x: torch.Tensor, source: torch.Tensor) -> torch.Tensor | None:
        if self.sf_use_ue8m0:
            return None
        if self._calibrating and x.numel() > 0:  # (an MoE expert may get no tokens)
            # siblings reading one tensor also read one cast of it (the fusion pass merges equal casts)
            self._observed_inputs.append(self._calibrating.input_key(source))
            # the largest finite magnitude: a NaN/inf element does not discard the batches before it
            magnitude = x.detach().abs()
            amax = torch.where(torch.isfinite(magnitude), magnitude, 0).amax().to(torch.float32).reshape(1)
            self._observed_amax = amax if self._observed_amax is None else torch.maximum(self._observed_amax, amax)
        if self.activation_scale == "static" and self._calibrated:
            return self.input_global_scale
        return api.nvfp4_global_scale(x)

    def _use_scaled_mm(self, x: torch.Tensor) -> bool:
        if self.matmul == "emulated":
            return False
        # torch._scaled_mm's FP4 shape rules: the packed K and N divisible by 16
        fits = scaled_mm_supported(x.device) and self.in_features % 32 == 0 and self.out_features % 16 == 0
        if self.matmul == "scaled_mm" and not fits:
            raise ValueError(
                "fp4op.nn.FP4Linear: matmul='scaled_mm' needs a CUDA GPU of capability 10.0+ and in_features % 32 "
                f"== 0, out_features % 16 == 0 (device {x.device}, in_features {self.in_features}, out_features "
                f"{self.out_features}); matmul='auto' falls back to the emulation"
            )
        return fits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"fp4op.nn.FP4Linear: expected input [..., {self.in_features}], got {tuple(x.shape)}")
        source = x  # the tensor the layer was called with: what calibrate() ties siblings by
        x = _autocast_input(x)
        out_dtype = x.dtype
        if x.dtype in (torch.float32, torch.float64):
            x = x.to(self.dtype)
        if x.dtype not in _MODEL_DTYPES:
            raise ValueError(
                f"fp4op.nn.FP4Linear: the input must be float16, bfloat16, float32 or float64, got {x.dtype}"
            )
        if torch.is_grad_enabled() and x.requires_grad:
            with torch.no_grad():
                out = self._forward_quantized(x, source)
            out = _StraightThroughInput.apply(
                x, out, self.weight_q, self.weight_sf, self.weight_global_scale, self.sf_vec_size,
                self.sf_use_ue8m0, self.dtype,
            )
            return out.to(out_dtype)
        return self._forward_quantized(x, source).to(out_dtype)

    def _forward_quantized(self, x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        gs = self._input_global_scale(x, source)
        # quantize at the input's rank (no reshape between the producer and the quantize: the fusion
        # rules see the norm/activation output directly)
        x_q, x_sf = torch.ops.fp4op.quantize(x, gs, self.sf_vec_size, self.sf_use_ue8m0)
        x_q = x_q.reshape(-1, self.in_features // 2)
        if self._use_scaled_mm(x):
            out = self._scaled_mm(x_q, x_sf, gs, x.dtype)
        else:
            out = self._emulated_mm(x_q, x_sf, gs, x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def _dequantize(self, q: torch.Tensor, sf: torch.Tensor, gs: torch.Tensor | None, dtype: torch.dtype):
        return _dequantize_swizzled(q, sf, gs, self.sf_vec_size, self.sf_use_ue8m0, dtype)

    def _emulated_mm(self, x_q, x_sf, gs, dtype):
        x = self._dequantize(x_q, x_sf, gs, dtype)
        w = self._dequantize(self.weight_q, self.weight_sf, self.weight_global_scale, dtype)
        return F.linear(x, w, self._bias(dtype))

    def _bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        # the output's dtype is the input's, which may differ from the layer's
        return self.bias if self.bias is None or self.bias.dtype == dtype else self.bias.to(dtype)

    def _scaled_mm(self, x_q, x_sf, gs, dtype):
        scale_dtype = torch.float8_e8m0fnu if self.sf_use_ue8m0 else torch.float8_e4m3fn
        out = torch._scaled_mm(
            x_q.view(torch.float4_e2m1fn_x2),
            self.weight_q.view(torch.float4_e2m1fn_x2).t(),
            x_sf.flatten().view(scale_dtype),
            self.weight_sf.flatten().view(scale_dtype),
            out_dtype=dtype,
        )
        if gs is not None:
            # the block scales hold amax / 6 * S; undo both global scales
            out = out * torch.reciprocal(gs * self.weight_global_scale).to(dtype)
        return out if self.bias is None else out + self._bias(dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"recipe={self.recipe}, activation_scale={self.activation_scale}, matmul={self.matmul}, dtype={self.dtype}"
        )


def _usable_amax(amax: torch.Tensor) -> bool:
    """Whether amax (or a scale of that form) and 448 * 6 / amax are finite positive float32 numbers: an
    amax below about 7.9e-36 is positive, but its scale is infinite."""
    amax = amax.to(torch.float32)
    scale = _FP4_MAX_TIMES_E4M3_MAX / amax
    return bool(torch.isfinite(amax).all() and (amax > 0).all() and torch.isfinite(scale).all())


def _excluded(name: str, exclude: Iterable[str]) -> bool:
    return any(name == pattern or fnmatch.fnmatchcase(name, pattern) for pattern in exclude)


class _LinearView(NamedTuple):
    """What FP4Linear.from_linear reads of a layer: y = x @ weight.T + bias."""

    in_features: int
    out_features: int
    weight: torch.Tensor  # [out_features, in_features]
    bias: torch.Tensor | None
    checkpoint_weight_transposed: bool  # the layer's checkpoints store weight [in_features, out_features]


def _from_transformers(module: nn.Module, name: str) -> bool:
    return type(module).__name__ == name and type(module).__module__.startswith("transformers.")


def _linear_view(module: nn.Module) -> nn.Linear | _LinearView | None:
    """`module` as a linear layer if it computes one: nn.Linear itself, transformers' FalconLinear (an
    nn.Linear whose forward writes `x @ weight.T + bias` out) and transformers' Conv1D (GPT-2 and its
    kin: weight [in, out], `addmm(bias, x, weight)`); None for anything else (other nn.Linear
    subclasses may compute something else: LoRA, bitsandbytes' quantized layers)."""
    if type(module) is nn.Linear or (isinstance(module, nn.Linear) and _from_transformers(module, "FalconLinear")):
        return module
    if _from_transformers(module, "Conv1D"):
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        nx, nf = getattr(module, "nx", None), getattr(module, "nf", None)
        if isinstance(weight, torch.Tensor) and tuple(weight.shape) == (nx, nf):
            return _LinearView(nx, nf, weight.detach().t(), None if bias is None else bias.detach(), True)
    return None


def convert(
    model: nn.Module,
    recipe: str = "nvfp4",
    exclude: Iterable[str] = (),
    activation_scale: str = "static",
    matmul: str = "auto",
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Replace, in place, every nn.Linear of `model` by an FP4Linear; returns `model`. transformers'
    FalconLinear and Conv1D (GPT-2's, weight stored [in, out]) are linear layers too and are replaced.

    An nn.TransformerEncoderLayer with a converted linear1/linear2 has its inference fast path turned
    off (that path reads the weights and never calls the layers' forward).

    Skipped: other subclasses of nn.Linear (their forward may differ: LoRA, bitsandbytes' quantized
    layers; nn.MultiheadAttention's out_proj) and other linear-like modules, layers whose in_features
    is not a multiple of the recipe's block (16 for NVFP4, 32 for MXFP4), and layers whose qualified
    name (as in ``model.named_modules()``) matches an entry of `exclude` exactly or as an fnmatch
    pattern (e.g. ``"lm_head"``, ``"*.gate"``).
    """
    _check_choice("recipe", recipe, RECIPES)
    exclude = () if exclude is None else (exclude,) if isinstance(exclude, str) else tuple(exclude)
    block = RECIPES[recipe][0]
    # every name of each layer: a module used at several places (shared) is replaced at all of them by
    # one FP4Linear, or, if one of its names is excluded, at none
    names: dict[int, list[str]] = {}
    linears: dict[int, nn.Linear | _LinearView] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        linear = _linear_view(module)
        if linear is not None and linear.in_features % block == 0:
            names.setdefault(id(module), []).append(name)
            linears[id(module)] = linear
    for key, linear in linears.items():
        if any(_excluded(name, exclude) for name in names[key]):
            continue
        if "" in names[key]:
            raise ValueError("fp4op.nn.convert: the model itself is a linear layer; use FP4Linear.from_linear")
        layer = FP4Linear.from_linear(linear, recipe, activation_scale, matmul, dtype)
        for name in names[key]:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, layer)
    for module in model.modules():
        # nn.TransformerEncoderLayer's inference fast path (eval, no grad) runs one fused kernel on
        # linear1/linear2's `.weight`, never calling their forward: an FP4Linear there would compute with
        # its dequantized weight and unquantized activations. A zero activation_relu_or_gelu is one of the
        # conditions that turns that path (and nn.TransformerEncoder's) off; the regular forward runs.
        if isinstance(module, nn.TransformerEncoderLayer) and any(
            isinstance(getattr(module, n, None), FP4Linear) for n in ("linear1", "linear2")
        ):
            module.activation_relu_or_gelu = 0
    return model


@contextlib.contextmanager
def calibrate(model: nn.Module, tie_siblings: bool = True) -> Iterator[None]:
    """Record the input amax of every static-scale NVFP4 FP4Linear of `model` over the forward calls
    inside the block (run them eagerly, on representative batches); on exit each layer's static
    activation scale becomes 448 * 6 / amax.

    With `tie_siblings`, layers that read the very same input tensor in every call (q/k/v projections
    of one norm output, gate/up projections) get one shared scale tensor: their quantizes of that input
    are then identical and Inductor's fusion pass merges them into one, which fuses with the norm before
    it (one fused op for all of them). Untied (or loaded from a checkpoint: separate tensors), the norm
    still fuses, as one fused op per layer, each recomputing the norm.
    """
    layers = [m for m in model.modules() if isinstance(m, FP4Linear) and m.input_global_scale is not None]
    calibration = _CalibrationPass()
    for layer in layers:
        layer._reset_calibration_state()
        layer._calibrating = calibration
    try:
        yield
    finally:
        groups: dict[tuple, list[FP4Linear]] = {}
        for layer in layers:
            layer._calibrating = None
            if layer._observed_amax is None:
                continue
            key = tuple(layer._observed_inputs) if tie_siblings else (id(layer),)
            groups.setdefault(key, []).append(layer)
        for siblings in groups.values():
            amax = torch.stack([layer._observed_amax for layer in siblings]).amax(dim=0)
            if not _usable_amax(amax):
                # all-zero, NaN or infinite inputs: no usable static scale
                warnings.warn(
                    f"fp4op.nn.calibrate: the observed input amax is {amax.item()}; {len(siblings)} layer(s) "
                    "not calibrated by this pass (they keep their previous static scale, or the dynamic one)",
                    stacklevel=3,
                )
                continue
            siblings[0]._untie_scale()  # a tie of an earlier pass ends here
            shared = siblings[0].input_global_scale
            for layer in siblings:
                layer.input_global_scale = shared  # the same tensor object (a buffer of each layer)
                layer._scale_tied = len(siblings) > 1
            siblings[0]._set_input_scale(amax)
            for layer in siblings[1:]:
                layer._calibrated = True
        for layer in layers:
            layer._reset_calibration_state()


class _CalibrationPass:
    """Tells the inputs of one `calibrate` pass apart: a tensor object gets a number for as long as it
    lives, so a later tensor at a freed one's address (and of its shape) is not taken for it."""

    def __init__(self):
        self._numbers: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._next = itertools.count()

    def input_key(self, x: torch.Tensor) -> tuple:
        number = self._numbers.get(x)
        if number is None:
            number = self._numbers[x] = next(self._next)
        # the version: the same tensor written in place between two reads is another input (inference
        # tensors keep no version and cannot be written outside inference mode)
        version = 0 if x.is_inference() else x._version
        return (number, version)


__all__ = ["FP4Linear", "convert", "calibrate", "scaled_mm_supported", "RECIPES"]
