"""fp4op.nn: FP4Linear numerics against the dequantized reference, calibration, convert."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fp4op
import fp4op.nn as fnn
from conftest import requires_cuda
from fp4op import reference

RECIPE_ARGS = {"nvfp4": (16, False), "mxfp4": (32, True)}


def _reference_linear(x, layer, gs):
    """Quantize x with fp4op.reference, dequantize both operands to the model dtype, F.linear."""
    vec, ue8m0 = RECIPE_ARGS[layer.recipe]
    x_q, x_sf = reference.quantize(x, gs, vec, ue8m0)
    x_dq = reference.dequantize(x_q, x_sf, gs, vec, ue8m0).to(x.dtype)
    w_dq = reference.dequantize(layer.weight_q, layer.weight_sf, layer.weight_global_scale, vec, ue8m0).to(x.dtype)
    return F.linear(x_dq, w_dq, None if layer.bias is None else layer.bias.to(x.dtype))


@pytest.mark.parametrize("recipe", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_fp4linear_matches_dequantized_reference(recipe, dtype, bias):
    linear = nn.Linear(64, 48, bias=bias, dtype=dtype)
    layer = fnn.FP4Linear.from_linear(linear, recipe=recipe, matmul="emulated")
    x = torch.randn(2, 5, 64, dtype=dtype) * 4
    with torch.no_grad():
        out = layer(x)
        gs = None if recipe == "mxfp4" else fp4op.nvfp4_global_scale(x)  # uncalibrated: dynamic
        assert out.shape == (2, 5, 48) and out.dtype == dtype
        torch.testing.assert_close(out, _reference_linear(x, layer, gs), rtol=0, atol=0)
        # and it approximates the bf16/fp16 layer (FP4 error: a few percent of the output scale)
        err = (out.float() - linear(x).float()).norm() / linear(x).float().norm()
        assert err < 0.2


def test_weight_quantized_once_at_conversion():
    linear = nn.Linear(32, 16, dtype=torch.bfloat16)
    layer = fnn.FP4Linear.from_linear(linear)
    w_q, w_sf = reference.quantize(linear.weight.detach(), fp4op.nvfp4_global_scale(linear.weight.detach()))
    assert torch.equal(layer.weight_q, w_q) and torch.equal(layer.weight_sf, w_sf)
    assert {n for n, _ in layer.named_buffers()} == {
        "weight_q", "weight_sf", "weight_global_scale", "input_global_scale", "bias"
    }
    assert not list(layer.parameters())


@pytest.mark.parametrize("recipe", ["nvfp4", "mxfp4"])
def test_weight_attribute_is_the_dequantized_weight(recipe):
    linear = nn.Linear(64, 32, dtype=torch.float16)
    layer = fnn.FP4Linear.from_linear(linear, recipe=recipe, matmul="emulated")
    vec, ue8m0 = RECIPE_ARGS[recipe]
    want = reference.dequantize(layer.weight_q, layer.weight_sf, layer.weight_global_scale, vec, ue8m0)
    w = layer.weight
    assert w.shape == (32, 64) and w.dtype == torch.float16 and w.device == linear.weight.device
    assert torch.equal(w, want.to(torch.float16))
    assert "weight" not in dict(layer.named_parameters()) and "weight" not in layer.state_dict()

    # model code that casts to the layer's weight dtype (Hugging Face T5's feed-forward)
    class T5DenseActDense(nn.Module):
        def __init__(self, wo):
            super().__init__()
            self.wo = wo

        def forward(self, h):
            if isinstance(self.wo.weight, torch.Tensor) and h.dtype != self.wo.weight.dtype:
                h = h.to(self.wo.weight.dtype)
            return self.wo(h)

    with torch.no_grad():
        out = T5DenseActDense(layer)(torch.randn(3, 64))
    assert out.dtype == torch.float16 and out.shape == (3, 32)

    # assigning a weight (a tied embedding, a Parameter) quantizes it into the buffers
    other = nn.Parameter(torch.randn(32, 64, dtype=torch.float16))
    layer.weight = other
    fresh = fnn.FP4Linear.from_linear(nn.Linear(64, 32, dtype=torch.float16), recipe=recipe)
    fresh.set_weight(other.detach())
    assert torch.equal(layer.weight_q, fresh.weight_q) and torch.equal(layer.weight_sf, fresh.weight_sf)
    assert not list(layer.parameters())
    with pytest.raises(ValueError, match="shape"):
        layer.weight = torch.randn(4, 4)


def test_static_scale_calibration_and_siblings():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(32, 32, dtype=torch.bfloat16)
            self.k = nn.Linear(32, 32, dtype=torch.bfloat16)
            self.o = nn.Linear(32, 32, dtype=torch.bfloat16)

        def forward(self, x):
            return self.o(self.q(x) * self.k(x))

    model = fnn.convert(Block())
    batches = [torch.randn(3, 32, dtype=torch.bfloat16) * s for s in (1, 5, 2)]
    with torch.no_grad(), fnn.calibrate(model):
        for b in batches:
            model(b)
    amax = max(b.abs().amax().float() for b in batches)
    assert model.q.input_global_scale.item() == pytest.approx((448 * 6 / amax).item())
    # q and k read the same tensor: one shared scale object; o reads another tensor
    assert model.q.input_global_scale is model.k.input_global_scale
    assert model.o.input_global_scale is not model.q.input_global_scale
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(model.q(x), _reference_linear(x, model.q, model.q.input_global_scale), rtol=0, atol=0)
    # the calibrated scale survives a state_dict round trip
    fresh = fnn.convert(Block())
    fresh.load_state_dict(model.state_dict())
    assert fresh.q._calibrated and torch.equal(fresh.q.input_global_scale, model.q.input_global_scale)


def test_dynamic_activation_scale():
    layer = fnn.FP4Linear.from_linear(nn.Linear(32, 8, dtype=torch.bfloat16), activation_scale="dynamic")
    assert layer.input_global_scale is None
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _reference_linear(x, layer, fp4op.nvfp4_global_scale(x)), rtol=0, atol=0)


def test_convert_swaps_skips_and_excludes():
    model = nn.Sequential(
        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 24), nn.Linear(24, 32), nn.Sequential(nn.Linear(32, 32))
    ).to(torch.bfloat16)
    fnn.convert(model, recipe="nvfp4", exclude=["4.*"])
    kinds = [type(m).__name__ for m in (model[0], model[2], model[3], model[4][0])]
    # 24 is not a multiple of 16: kept; "4.0" excluded by pattern
    assert kinds == ["FP4Linear", "FP4Linear", "Linear", "Linear"]
    model = fnn.convert(nn.Sequential(nn.Linear(64, 8), nn.Linear(48, 8)), recipe="mxfp4", exclude=["0"])
    assert [type(m).__name__ for m in model] == ["Linear", "Linear"]  # 48 % 32 != 0
    fp32 = fnn.convert(nn.Sequential(nn.Linear(32, 8)))  # float32 weights are quantized from bfloat16
    assert fp32[0].dtype == torch.bfloat16


class Conv1D(nn.Module):
    """transformers.pytorch_utils.Conv1D as written there (GPT-2's c_attn/c_fc/c_proj): weight [in, out]."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class FalconLinear(nn.Linear):
    """transformers' FalconLinear as written there."""

    def forward(self, input):
        hidden_states = input @ self.weight.T
        return hidden_states if self.bias is None else hidden_states + self.bias


class LoraLinear(nn.Linear):
    """An nn.Linear subclass whose forward is not a linear layer's of its weight: left alone."""

    def forward(self, input):
        return super().forward(input) + input[..., : self.out_features]


Conv1D.__module__ = "transformers.pytorch_utils"
FalconLinear.__module__ = "transformers.models.falcon.modeling_falcon"


@pytest.mark.parametrize("recipe", ["nvfp4", "mxfp4"])
def test_convert_transformers_linear_layers(recipe):
    """GPT-2's Conv1D and Falcon's FalconLinear are linear layers: replaced, computing what an
    FP4Linear of the same nn.Linear computes; other nn.Linear subclasses are left alone."""
    torch.manual_seed(0)
    conv, falcon = Conv1D(96, 64), FalconLinear(64, 32)
    model = nn.Sequential(conv, nn.GELU(), Conv1D(64, 96), falcon, LoraLinear(32, 32)).to(torch.bfloat16)
    as_linear = []
    for m in (model[0], model[2], model[3]):
        w = m.weight.detach().t() if isinstance(m, Conv1D) else m.weight.detach()
        ref = nn.Linear(w.shape[1], w.shape[0], dtype=torch.bfloat16)
        with torch.no_grad():
            ref.weight.copy_(w)
            ref.bias.copy_(m.bias)
        as_linear.append(fnn.FP4Linear.from_linear(ref, recipe, matmul="emulated"))
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        eager = model(x)
    fnn.convert(model, recipe, matmul="emulated")
    assert [type(m).__name__ for m in model] == ["FP4Linear", "GELU", "FP4Linear", "FP4Linear", "LoraLinear"]
    assert (model[0].in_features, model[0].out_features) == (64, 96)
    with torch.no_grad():
        out = model(x)
        want = model[4](as_linear[2](as_linear[1](model[1](as_linear[0](x)))))
        assert torch.equal(out, want)
        assert (out.float() - eager.float()).norm() / eager.float().norm() < 0.2
    # from_linear takes a Conv1D too, and names what it cannot take
    conv = Conv1D(16, 32)
    layer = fnn.FP4Linear.from_linear(conv)
    assert (layer.in_features, layer.out_features) == (32, 16)
    assert (layer.weight.float() - conv.weight.t()).norm() / conv.weight.norm() < 0.15
    with pytest.raises(TypeError, match="Conv1D"):
        fnn.FP4Linear.from_linear(nn.Conv1d(32, 16, 1))


def test_conv1d_checkpoint_loads_into_a_converted_model():
    """A GPT-2 checkpoint (Conv1D weights stored [in, out]) loads into the converted model as its own
    conversion: square layers too (a transposed load would pass the shape check), and into a model
    built on the meta device with assign=True."""
    torch.manual_seed(0)
    source = nn.Sequential(Conv1D(64, 64), Conv1D(96, 64)).to(torch.bfloat16)
    checkpoint = source.state_dict()
    direct = fnn.convert(copy.deepcopy(source))
    loaded = fnn.convert(nn.Sequential(Conv1D(64, 64), Conv1D(96, 64)).to(torch.bfloat16))
    loaded.load_state_dict(checkpoint)
    with torch.device("meta"):
        on_meta = fnn.convert(nn.Sequential(Conv1D(64, 64), Conv1D(96, 64)).to(torch.bfloat16))
    on_meta.load_state_dict(checkpoint, assign=True)
    for model in (loaded, on_meta):
        for got, want in zip(model, direct):
            assert torch.equal(got.weight_q, want.weight_q) and torch.equal(got.weight_sf, want.weight_sf)
            assert torch.equal(got.bias, want.bias)
    with pytest.raises(RuntimeError, match=r"size mismatch for 1.weight.*\[64, 96\]"):
        loaded.load_state_dict({**checkpoint, "1.weight": checkpoint["1.weight"].t()})


@pytest.mark.parametrize("stacked", [False, True])
def test_convert_turns_off_the_transformer_encoder_fast_path(stacked, monkeypatch):
    """nn.TransformerEncoderLayer's eval/no-grad fast path reads linear1/linear2's weights in one fused
    kernel and never calls their forward: after convert the FP4Linears run there (their activations
    quantized). (Counted by patching forward: a hook would itself turn the fast path off.)"""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True, dropout=0.0)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False) if stacked else layer
    model = fnn.convert(model.to(torch.bfloat16).eval(), activation_scale="dynamic")
    calls = []
    forward = fnn.FP4Linear.forward
    monkeypatch.setattr(fnn.FP4Linear, "forward", lambda self, x: calls.append(1) or forward(self, x))
    with torch.no_grad():
        out = model(torch.randn(2, 8, 64, dtype=torch.bfloat16))
    assert len(calls) == (4 if stacked else 2) and out.shape == (2, 8, 64)


def test_errors():
    with pytest.raises(ValueError, match="recipe"):
        fnn.FP4Linear(32, 8, recipe="int4")
    with pytest.raises(ValueError, match="multiple"):
        fnn.FP4Linear(24, 8)
    with pytest.raises(ValueError, match="activation_scale"):
        fnn.FP4Linear(32, 8, activation_scale="per-row")
    layer = fnn.FP4Linear(32, 8)
    with pytest.raises(ValueError, match="expected input"):
        layer(torch.randn(2, 16, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="set_input_amax"):
        fnn.FP4Linear(32, 8, recipe="mxfp4").set_input_amax(1.0)


def test_more_errors():
    with pytest.raises(ValueError, match="in_features"):
        fnn.FP4Linear(-16, 8)
    with pytest.raises(ValueError, match="out_features"):
        fnn.FP4Linear(32, -8)
    layer = fnn.FP4Linear(32, 8)
    with pytest.raises(ValueError, match="float16, bfloat16"):
        layer(torch.randn(2, 32).to(torch.float8_e4m3fn))
    with pytest.raises(ValueError, match="expected input"):
        layer(torch.tensor(1.0, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="floating-point"):
        layer.set_weight(torch.ones(8, 32, dtype=torch.int32))


def test_input_dtype_other_than_the_layers():
    # a float16 input to a bfloat16 layer: the output (and the bias added to it) in float16
    lin = nn.Linear(32, 8, dtype=torch.bfloat16)
    layer = fnn.FP4Linear.from_linear(lin, activation_scale="dynamic")
    x = torch.randn(4, 32, dtype=torch.float16)
    with torch.no_grad():
        out = layer(x)
    assert out.dtype == torch.float16
    w = fp4op.dequantize(layer.weight_q, layer.weight_sf, layer.weight_global_scale, output_dtype=torch.float16)
    x_dq = fp4op.dequantize(*fp4op.fp4_quantize(x, fp4op.nvfp4_global_scale(x)), fp4op.nvfp4_global_scale(x),
                            output_dtype=torch.float16)
    torch.testing.assert_close(out, F.linear(x_dq, w, layer.bias.to(torch.float16)), rtol=0, atol=0)


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_autocast_casts_the_input_as_nn_linear_does(autocast_dtype, input_dtype):
    # under torch.autocast nn.Linear computes in the autocast dtype whatever float dtype its input has
    # (a LayerNorm's float32 output, say); FP4Linear quantizes that cast input
    layer = fnn.FP4Linear.from_linear(nn.Linear(32, 8, dtype=torch.bfloat16), activation_scale="dynamic")
    x = torch.randn(4, 32, dtype=input_dtype)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=autocast_dtype):
            out = layer(x)
            assert nn.Linear(32, 8)(x).dtype == out.dtype == autocast_dtype
        expected = layer(x.to(autocast_dtype))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.float64])
def test_float_input_computes_in_the_layers_dtype(input_dtype):
    # a converted float32 model keeps taking its float32 inputs: quantized from the layer's dtype, the
    # output cast back, as nn.Linear returns its input's dtype
    layer = fnn.FP4Linear.from_linear(nn.Linear(32, 8), activation_scale="dynamic")
    assert layer.dtype == torch.bfloat16
    x = torch.randn(2, 32, dtype=input_dtype)
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        out = layer(x)
        assert out.dtype == input_dtype
        torch.testing.assert_close(out, layer(x.to(torch.bfloat16)).to(input_dtype), rtol=0, atol=0)


@pytest.mark.parametrize("cast", ["half", "bfloat16", "to_float16", "float"])
def test_model_casts_keep_the_float32_scales(cast):
    # .half() on a converted model: the global scales keep their float32 bits (in float16 448 * 6 / amax
    # overflows for amax < 0.041: the weight dequantized to zeros), the layer's dtype and bias follow
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 64, dtype=torch.bfloat16))
    model[0].weight.data *= 0.03 / model[0].weight.data.abs().max()
    fnn.convert(model)
    with torch.no_grad(), fnn.calibrate(model):
        model(torch.randn(4, 1024, dtype=torch.bfloat16))
    layer = model[0]
    scales = (layer.weight_global_scale.clone(), layer.input_global_scale.clone())
    assert scales[0].item() > 65504  # beyond float16
    weight = layer.weight.float()
    {"half": model.half, "bfloat16": model.bfloat16, "to_float16": lambda: model.to(torch.float16),
     "float": model.float}[cast]()
    assert layer.weight_global_scale.dtype == layer.input_global_scale.dtype == torch.float32
    assert torch.equal(layer.weight_global_scale, scales[0]) and torch.equal(layer.input_global_scale, scales[1])
    expected_dtype = {"half": torch.float16, "to_float16": torch.float16}.get(cast, torch.bfloat16)
    assert layer.dtype == expected_dtype and layer.weight.dtype == expected_dtype
    # the same weight values (exact in either 16-bit dtype: E2M1 codes times an E4M3 scale / S)
    torch.testing.assert_close(layer.weight.float(), weight, rtol=2**-7, atol=0)
    x = torch.randn(4, 1024, dtype=expected_dtype)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _reference_linear(x, layer, layer.input_global_scale), rtol=0, atol=0)


def test_input_gradient_straight_through_the_quantize():
    # with grad enabled, the input gets the gradient of x @ W^T (W dequantized): the activation quantize
    # taken as the identity; the FP4 weight and the bias are buffers, frozen
    layer = fnn.FP4Linear.from_linear(nn.Linear(64, 16, dtype=torch.bfloat16))
    with torch.no_grad(), fnn.calibrate(layer):
        layer(torch.randn(3, 64, dtype=torch.bfloat16))
    for scale in ("static", "dynamic"):
        layer._calibrated = scale == "static"
        x = torch.randn(2, 3, 64, dtype=torch.bfloat16, requires_grad=True)
        out = layer(x)
        assert out.requires_grad
        with torch.no_grad():
            torch.testing.assert_close(out, layer(x), rtol=0, atol=0)
        grad_out = torch.randn_like(out)
        out.backward(grad_out)
        torch.testing.assert_close(x.grad, grad_out @ layer.weight, rtol=0, atol=0)
    # a float32 input under autocast: the gradient flows back through the cast
    x = torch.randn(3, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x).sum().backward()
    assert x.grad.dtype == torch.float32 and x.grad.abs().sum() > 0


def test_more_construction_and_weight_errors():
    with pytest.raises(ValueError, match="positive multiple"):
        fnn.FP4Linear(0, 8)
    layer = fnn.FP4Linear(32, 8)
    for bad in (float("inf"), float("nan")):
        weight = torch.randn(8, 32)
        weight[3, 5] = bad
        with pytest.raises(ValueError, match="infinite or NaN"):
            layer.set_weight(weight)
    with pytest.raises(ValueError, match="scaled_mm"):  # no sm_100 GPU: a clear error, not torch's
        fnn.FP4Linear(32, 8, matmul="scaled_mm")(torch.randn(2, 32, dtype=torch.bfloat16))


def test_meta_device_forward():
    # shape inference and FLOP counting run models on the meta device, as nn.Linear allows
    layer = fnn.FP4Linear(64, 32, device="meta")
    assert layer(torch.empty(4, 64, dtype=torch.bfloat16, device="meta")).shape == (4, 32)


@pytest.mark.parametrize("activation_scale", ["static", "dynamic"])
@pytest.mark.parametrize("recipe", ["nvfp4", "mxfp4"])
def test_empty_batch(recipe, activation_scale):
    layer = fnn.FP4Linear.from_linear(nn.Linear(32, 8, dtype=torch.bfloat16), recipe, activation_scale)
    with torch.no_grad():
        assert layer(torch.randn(0, 32, dtype=torch.bfloat16)).shape == (0, 8)
        assert layer(torch.randn(2, 0, 32, dtype=torch.bfloat16)).shape == (2, 0, 8)


# 1e-45 and 5e-36: positive, but 448 * 6 / amax overflows float32 (an infinite scale quantizes every input to 0)
@pytest.mark.parametrize("amax", [0.0, -1.0, float("nan"), float("inf"), 1e-45, 5e-36])
def test_unusable_amax_is_rejected(amax):
    layer = fnn.FP4Linear.from_linear(nn.Linear(32, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="amax"):
        layer.set_input_amax(amax)
    assert not layer._calibrated


@pytest.mark.parametrize("batch", ["zeros", "nan"])
def test_calibration_without_usable_amax_keeps_dynamic_scale(batch):
    # an all-zero (or NaN) calibration batch would give an infinite (NaN) static scale: every later
    # output the bias alone (NaN); the layer stays on the dynamic scale instead, and says so
    lin = nn.Linear(32, 8, dtype=torch.bfloat16)
    model = nn.Sequential(fnn.FP4Linear.from_linear(lin))
    x = torch.zeros(4, 32, dtype=torch.bfloat16)
    if batch == "nan":
        x[1, 3] = float("nan")
    with torch.no_grad(), pytest.warns(UserWarning, match="not calibrated"), fnn.calibrate(model):
        model(x)
    assert not model[0]._calibrated
    y = torch.randn(4, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(model(y), _reference_linear(y, model[0], fp4op.nvfp4_global_scale(y)), rtol=0, atol=0)


def test_calibration_tells_a_new_tensor_at_a_freed_address_apart():
    # sibling tying keys on the tensor objects a pass read, not on their addresses: a tensor allocated
    # where a freed one lived (same shape, same address) is another input
    calibration = fnn._CalibrationPass()
    first = torch.randn(8, 32)
    key, address = calibration.input_key(first), first.data_ptr()
    assert calibration.input_key(first) == key
    del first
    for _ in range(50):
        second = torch.randn(8, 32)
        assert calibration.input_key(second) != key
        if second.data_ptr() == address:
            break
    second.add_(1)  # written in place: another input too
    assert calibration.input_key(second) != calibration.input_key(torch.randn(1))


def test_calibration_under_inference_mode_empty_inputs_and_nan_batches():
    experts = nn.ModuleList(nn.Linear(32, 8, dtype=torch.bfloat16) for _ in range(2))
    fnn.convert(experts)
    with torch.inference_mode(), fnn.calibrate(experts):
        experts[0](torch.randn(4, 32, dtype=torch.bfloat16) * 3)
        experts[1](torch.empty(0, 32, dtype=torch.bfloat16))  # an expert that got no tokens
        nan_batch = torch.full((4, 32), float("nan"), dtype=torch.bfloat16)
        nan_batch[0, 0] = 1.0
        experts[0](nan_batch)  # the finite elements count; the batch before is not discarded
    assert experts[0]._calibrated and not experts[1]._calibrated
    assert experts[0].input_global_scale.item() < 448 * 6 / 2  # amax from the first batch (> 2)


def test_copy_made_while_calibrating_is_not_calibrating():
    import copy

    layer = fnn.FP4Linear.from_linear(nn.Linear(32, 8, dtype=torch.bfloat16))
    with torch.no_grad(), fnn.calibrate(layer):
        layer(torch.randn(2, 32, dtype=torch.bfloat16))
        clone = copy.deepcopy(layer)
    for _ in range(3):
        with torch.no_grad():
            clone(torch.randn(2, 32, dtype=torch.bfloat16))
    assert not clone._calibrating and clone._observed_inputs == [] and clone._observed_amax is None


def _calibrated_qk(input_dtype=torch.bfloat16):
    class QK(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k = (nn.Linear(32, 32, dtype=torch.bfloat16) for _ in range(2))

        def forward(self, x):
            return self.q(x) + self.k(x)

    model = fnn.convert(QK())
    with torch.no_grad(), fnn.calibrate(model):
        model(torch.randn(3, 32, dtype=input_dtype))
    return model


def test_tied_scales_are_saved_apart_and_set_apart():
    model = _calibrated_qk()
    assert model.q.input_global_scale is model.k.input_global_scale
    state = model.state_dict()
    assert state["q.input_global_scale"].data_ptr() != state["k.input_global_scale"].data_ptr()
    k_scale = model.k.input_global_scale.item()
    model.q.set_input_amax(100.0)  # q's own scale; k keeps its calibrated one
    assert model.k.input_global_scale.item() == k_scale
    assert model.q.input_global_scale.item() == pytest.approx(448 * 6 / 100)


def test_checkpoint_into_tied_siblings_keeps_each_layers_scale():
    a, b = (fnn.FP4Linear.from_linear(nn.Linear(32, 16, dtype=torch.bfloat16)) for _ in range(2))
    pair = nn.ModuleList([a, b])
    x = torch.randn(2, 32, dtype=torch.bfloat16)
    with torch.no_grad(), fnn.calibrate(pair):
        a(x)
        b(x)
    assert a.input_global_scale is b.input_global_scale
    state = {k: v.clone() for k, v in pair.state_dict().items()}
    state["0.input_global_scale"] = torch.tensor([5.0])
    state["1.input_global_scale"] = torch.tensor([7.0])
    pair.load_state_dict(state)
    assert (a.input_global_scale.item(), b.input_global_scale.item()) == (5.0, 7.0)
    assert a._calibrated and b._calibrated
    # an untied layer loads into its own buffer in place (a captured graph keeps reading it)
    buffer = a.input_global_scale
    state["0.input_global_scale"] = torch.tensor([3.0])
    pair.load_state_dict(state)
    assert a.input_global_scale is buffer and buffer.item() == 3.0


def test_convert_replaces_a_shared_layer_everywhere():
    shared = nn.Linear(32, 32, dtype=torch.bfloat16)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    fnn.convert(model)
    assert isinstance(model[0], fnn.FP4Linear) and model[0] is model[2]
    # excluded under one of its names: kept at both
    model = fnn.convert(nn.Sequential(shared, nn.ReLU(), shared), exclude=["2"])
    assert type(model[0]) is nn.Linear and model[0] is model[2]


def test_convert_exclude_forms():
    def build():
        return nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))

    assert [type(m).__name__ for m in fnn.convert(build(), exclude="1")] == ["FP4Linear", "Linear"]
    assert [type(m).__name__ for m in fnn.convert(build(), exclude=None)] == ["FP4Linear", "FP4Linear"]


@requires_cuda
@pytest.mark.parametrize("recipe", ["nvfp4", "mxfp4"])
def test_cuda_matmul_paths(recipe):
    """On CUDA: the emulated path equals the CPU one; on sm_100+ the scaled_mm path agrees with it."""
    linear = nn.Linear(256, 128, dtype=torch.bfloat16)
    cpu = fnn.FP4Linear.from_linear(linear, recipe=recipe, matmul="emulated")
    gpu = fnn.FP4Linear.from_linear(linear.cuda(), recipe=recipe, matmul="emulated")
    x = torch.randn(33, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(gpu(x.cuda()).cpu(), cpu(x), rtol=1e-2, atol=1e-2)
        if fnn.scaled_mm_supported(torch.device("cuda")):
            fast = fnn.FP4Linear.from_linear(linear, recipe=recipe, matmul="scaled_mm")
            torch.testing.assert_close(fast(x.cuda()), gpu(x.cuda()), rtol=2e-2, atol=2e-2)


@requires_cuda
def test_cuda_move_keeps_the_scales_and_results():
    # a model converted and calibrated on the CPU, then moved: the float32 scales travel as raw bytes
    model = nn.Sequential(nn.Linear(64, 32, dtype=torch.bfloat16))
    fnn.convert(model)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    with torch.no_grad(), fnn.calibrate(model):
        model(x)
    scales = (model[0].weight_global_scale.clone(), model[0].input_global_scale.clone())
    with torch.no_grad():
        on_cpu = model(x)
        model.cuda()
        assert model[0].weight_global_scale.device.type == "cuda"
        assert model[0].weight_global_scale.dtype == torch.float32
        assert torch.equal(model[0].weight_global_scale.cpu(), scales[0])
        assert torch.equal(model[0].input_global_scale.cpu(), scales[1])
        torch.testing.assert_close(model(x.cuda()).cpu(), on_cpu, rtol=0.01, atol=0.01)


@pytest.mark.parametrize("assign_on_meta", [False, True])
def test_load_an_nn_linear_checkpoint_into_a_converted_model(assign_on_meta):
    # convert first, load the original weights after (or build on the meta device, convert, load with
    # assign=True): the weight is quantized on load, as set_weight would; no static scale in such a
    # checkpoint (the layer keeps the dynamic scale until calibrated), so strict loading passes
    torch.manual_seed(0)
    original = nn.Sequential(nn.Linear(64, 32, dtype=torch.bfloat16), nn.ReLU(), nn.Linear(32, 16))
    checkpoint = original.state_dict()
    if assign_on_meta:
        with torch.device("meta"):
            model = nn.Sequential(nn.Linear(64, 32, dtype=torch.bfloat16), nn.ReLU(), nn.Linear(32, 16))
        fnn.convert(model)
        model.load_state_dict(checkpoint, assign=True)
    else:
        model = fnn.convert(nn.Sequential(nn.Linear(64, 32, dtype=torch.bfloat16), nn.ReLU(), nn.Linear(32, 16)))
        model.load_state_dict(checkpoint)
    expected = fnn.convert(original)
    for got, want in zip(model[::2], expected[::2]):
        assert torch.equal(got.weight_q, want.weight_q) and torch.equal(got.weight_sf, want.weight_sf)
        assert torch.equal(got.weight_global_scale, want.weight_global_scale)
        assert torch.equal(got.bias.to(want.bias.dtype), want.bias) and not got._calibrated
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected(x), rtol=0, atol=0)
        with fnn.calibrate(model):  # the static scales (real tensors, also after a meta build) calibrate
            model(x)
    assert all(layer._calibrated and layer.input_global_scale.device.type == "cpu" for layer in model[::2])
    bad = dict(checkpoint, **{"0.weight": torch.randn(32, 48)})
    with pytest.raises(RuntimeError, match="size mismatch for 0.weight"):
        fnn.convert(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))).load_state_dict(bad)


def test_in_place_ops_on_outputs_and_torch_func_in_training():
    # the straight-through output is a tensor of its own: in-place ops after the layer work as after
    # nn.Linear, and torch.func's transforms run through it
    layer = fnn.FP4Linear.from_linear(nn.Linear(32, 16, dtype=torch.bfloat16), activation_scale="dynamic")
    x = torch.randn(4, 32, dtype=torch.bfloat16, requires_grad=True)
    nn.Sequential(layer, nn.ReLU(inplace=True))(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    out = layer(x)
    out += 1
    out.sum().backward()
    grad = torch.func.grad(lambda v: layer(v).float().sum())(x.detach())
    torch.testing.assert_close(grad, (torch.ones(4, 16, dtype=torch.bfloat16) @ layer.weight), rtol=0, atol=0)


def test_calibration_ties_siblings_of_a_float32_input():
    # each layer casts the float32 input itself: the tie is on the tensor the layers were called with
    model = _calibrated_qk(torch.float32)
    assert model.q.input_global_scale is model.k.input_global_scale


@pytest.mark.parametrize("cast", ["half", "to_cpu", "type_half", "share_memory"])
def test_model_casts_and_moves_keep_the_tie_and_the_bytes(cast):
    model = _calibrated_qk()
    codes = model.q.weight_q.clone()
    {"half": model.half, "to_cpu": lambda: model.to("cpu"), "type_half": lambda: model.type(torch.float16),
     "share_memory": model.share_memory}[cast]()
    assert model.q.input_global_scale is model.k.input_global_scale  # still one tensor: the quantizes merge
    assert model.q.weight_q.dtype == torch.uint8 and torch.equal(model.q.weight_q, codes)
    assert model.q.input_global_scale.dtype == torch.float32
    with torch.no_grad():
        model(torch.randn(2, 32, dtype=model.q.dtype))


def test_bad_nn_linear_checkpoints_are_reported_like_torch_does():
    model = fnn.convert(nn.Sequential(nn.Linear(64, 32, dtype=torch.bfloat16)))
    with torch.no_grad(), fnn.calibrate(model):
        model(torch.randn(2, 64, dtype=torch.bfloat16))
    scale, codes = model[0].input_global_scale.clone(), model[0].weight_q.clone()
    for weight, message in ((torch.randn(32, 48), "size mismatch for 0.weight"),
                            (torch.ones(32, 64, dtype=torch.int32), "floating-point"),
                            (torch.full((32, 64), float("inf")), "infinite or NaN")):
        with pytest.raises(RuntimeError, match=message) as err:
            model.load_state_dict({"0.weight": weight, "0.bias": torch.zeros(32)})
        assert "Missing key" not in str(err.value)
        # nothing changed: the codes and the calibrated scale stand
        assert torch.equal(model[0].weight_q, codes) and torch.equal(model[0].input_global_scale, scale)
        assert model[0]._calibrated
