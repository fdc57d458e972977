"""fp4op.fusion: Inductor passes that fuse a norm or activation with the FP4 quantize after it."""
