"""fp4op: NVFP4 and MXFP4 quantization for PyTorch.

* ``fp4op.fp4_quantize`` -- drop-in for ``flashinfer.quantization.fp4_quantize`` (CPU and CUDA);
* ``torch.ops.fp4op.quantize`` / ``torch.ops.fp4op.dequantize`` -- the custom ops;
* ``fp4op.reference`` -- SPEC.md in plain PyTorch; ``fp4op.layouts`` -- scale-factor layouts.
"""

from . import fused_ops, layouts, ops, reference
from .api import as_float4, dequantize, fp4_quantize, nvfp4_global_scale

__all__ = ["fp4_quantize", "dequantize", "nvfp4_global_scale", "as_float4", "layouts", "ops", "reference"]
__version__ = "0.1.0"
