"""Scale-factor layouts (SPEC.md "Scale-factor layouts").

`sf` is always a 2-D uint8 tensor:

* ``"128x4"`` swizzled: ``[round_up(M, 128), round_up(K/vec, 4)]``, the layout cuBLAS/CUTLASS
  block-scaled GEMMs and ``torch._scaled_mm`` read (torchao calls it ``to_blocked``);
* ``"8x4"`` swizzled: ``[round_up(M, 8), round_up(K/vec, 4)]``;
* ``"linear"``: ``[M, K/vec]`` row-major.

The converters here are plain tensor ops (pad, view, permute), so they run on any device and trace
under ``torch.compile``.
"""

from __future__ import annotations

import torch

SWIZZLED_128x4 = "128x4"
SWIZZLED_8x4 = "8x4"
LINEAR = "linear"
LAYOUTS = (SWIZZLED_128x4, SWIZZLED_8x4, LINEAR)

# the (row tile, column tile) of each layout's padding
_TILE = {SWIZZLED_128x4: (128, 4), SWIZZLED_8x4: (8, 4), LINEAR: (1, 1)}


def layout_from_flags(is_sf_swizzled_layout: bool, is_sf_8x4_layout: bool) -> str:
    """The layout name of flashinfer's (is_sf_swizzled_layout, is_sf_8x4_layout) flags."""
    if not is_sf_swizzled_layout:
        return LINEAR
    return SWIZZLED_8x4 if is_sf_8x4_layout else SWIZZLED_128x4


def layout_flags(layout: str) -> tuple[bool, bool]:
    """flashinfer's (is_sf_swizzled_layout, is_sf_8x4_layout) flags of a layout name."""
    _check_layout(layout)
    return layout != LINEAR, layout == SWIZZLED_8x4


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"fp4op: layout must be one of {LAYOUTS}, got {layout!r}")


def _check_sizes(**sizes) -> None:
    # ints only (SymInts of a traced shape are sizes already)
    for name, value in sizes.items():
        if isinstance(value, bool) or (isinstance(value, int) and value < 0):
            raise ValueError(f"fp4op: {name} must be a non-negative int, got {value!r}")


def _round_up(x, m):
    return (x + m - 1) // m * m


def sf_shape(m, nk, layout: str):
    """Shape of the sf tensor for M rows and nk = K / sf_vec_size scale columns (SymInt-friendly)."""
    _check_layout(layout)
    _check_sizes(m=m, nk=nk)
    rows, cols = _TILE[layout]
    return (_round_up(m, rows), _round_up(nk, cols))


def sf_offset(m: int, k: int, nk: int, layout: str) -> int:
    """Offset of scale (row m, block column k) in the flattened sf tensor (Python ints: any size)."""
    _check_layout(layout)
    _check_sizes(m=m, k=k, nk=nk)
    nk4 = (nk + 3) // 4
    if layout == SWIZZLED_128x4:
        return (m // 128) * nk4 * 512 + (k // 4) * 512 + (m % 32) * 16 + ((m % 128) // 32) * 4 + (k % 4)
    if layout == SWIZZLED_8x4:
        return (m // 8) * nk4 * 32 + (k // 4) * 32 + (m % 8) * 4 + (k % 4)
    return m * nk + k


def swizzle(sf_linear: torch.Tensor, layout: str = SWIZZLED_128x4) -> torch.Tensor:
    """Linear ``[M, nk]`` scales -> the swizzled layout's 2-D tensor, padding filled with 0."""
    _check_layout(layout)
    if sf_linear.dim() != 2:
        raise ValueError(f"fp4op: sf_linear must be 2-D [M, K/sf_vec_size], got shape {tuple(sf_linear.shape)}")
    if layout == LINEAR:
        return sf_linear.contiguous()
    m, nk = sf_linear.shape
    rows, cols = sf_shape(m, nk, layout)
    padded = torch.nn.functional.pad(sf_linear, (0, cols - nk, 0, rows - m))
    if layout == SWIZZLED_128x4:
        # offset = (m//128, k//4, m%32, (m%128)//32, k%4)
        tiles = padded.view(rows // 128, 4, 32, cols // 4, 4).permute(0, 3, 2, 1, 4)
    else:
        # offset = (m//8, k//4, m%8, k%4)
        tiles = padded.view(rows // 8, 8, cols // 4, 4).permute(0, 2, 1, 3)
    return tiles.reshape(rows, cols)


def unswizzle(sf: torch.Tensor, m: int, nk: int, layout: str = SWIZZLED_128x4) -> torch.Tensor:
    """A layout's sf tensor -> linear ``[m, nk]`` scales (the padding is dropped)."""
    _check_layout(layout)
    rows, cols = sf_shape(m, nk, layout)
    if sf.numel() != rows * cols:
        raise ValueError(
            f"fp4op: sf must have {rows} x {cols} elements for m={m}, nk={nk} and layout {layout!r}, "
            f"got shape {tuple(sf.shape)}"
        )
    if layout == LINEAR:
        return sf.reshape(m, nk)
    if layout == SWIZZLED_128x4:
        tiles = sf.reshape(rows // 128, cols // 4, 32, 4, 4).permute(0, 3, 2, 1, 4)
    else:
        tiles = sf.reshape(rows // 8, cols // 4, 8, 4).permute(0, 2, 1, 3)
    return tiles.reshape(rows, cols)[:m, :nk]


def convert(sf: torch.Tensor, m: int, nk: int, src: str, dst: str) -> torch.Tensor:
    """Re-lay scales from layout `src` to layout `dst`."""
    return swizzle(unswizzle(sf, m, nk, src), dst)
