"""Packed low-bit storage of basis components.

int8: symmetric, one float32 scale per component (row): code = round(v / scale), scale = max|v| / 127.
nf4: 4-bit NormalFloat codes (QLoRA's 16 levels, spaced for normally distributed values), in
blocks of BLOCK values with one float16 absmax per block, two codes per byte.

A component row of an orthonormal basis has entries of size ~1/sqrt(D) with a few larger ones; a
per-row (int8) or per-block (nf4) scale follows them much more closely than one scale per tensor.
Stored bytes per value: 1 + 4/D (int8), 0.5 + 2/BLOCK (nf4), against 4 for float32.
"""

from __future__ import annotations

import torch

SCHEMES = ("int8", "nf4")
FIELDS = ("int8", "int8_scale", "nf4", "nf4_absmax")  # what encode returns, by scheme
BLOCK = 64
# The NF4 levels of QLoRA (Dettmers et al. 2023), ascending.
NF4_LEVELS = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ]
)
_NF4_MIDPOINTS = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2


def bits_scheme(bits: int) -> str:
    """vlora's `quantize(bits)` argument as a scheme name."""
    schemes = {8: "int8", 4: "nf4"}
    if bits not in schemes:
        raise ValueError(f"bits must be 8 (int8) or 4 (nf4), got {bits!r}")
    return schemes[bits]


def encode(components: torch.Tensor, scheme: str) -> dict[str, torch.Tensor]:
    """The stored fields of a (k, D) float component matrix, by suffix: `int8` + `int8_scale`, or
    `nf4` + `nf4_absmax`."""
    x = components.detach().to("cpu", torch.float32)
    if scheme == "int8":
        scale = x.abs().amax(dim=1) / 127
        codes = torch.round(x / scale.clamp_min(torch.finfo(torch.float32).tiny)[:, None]).clamp(-127, 127)
        return {"int8": codes.to(torch.int8), "int8_scale": scale}
    if scheme == "nf4":
        k, d = x.shape
        blocks = torch.nn.functional.pad(x, (0, -d % BLOCK)).view(k, -1, BLOCK)
        absmax = blocks.abs().amax(dim=2).to(torch.float16)
        # Normalise by the stored (float16) absmax, so decoding inverts exactly what was coded.
        normal = blocks / absmax.to(torch.float32).clamp_min(torch.finfo(torch.float32).tiny)[:, :, None]
        codes = torch.bucketize(normal.clamp(-1, 1), _NF4_MIDPOINTS).to(torch.uint8).view(k, -1)
        return {"nf4": (codes[:, 0::2] << 4) | codes[:, 1::2], "nf4_absmax": absmax}
    raise ValueError(f"unknown quantization {scheme!r} (expected one of {', '.join(SCHEMES)})")


def decode(fields: dict[str, torch.Tensor], width: int) -> torch.Tensor:
    """The (k, width) float32 components from what `encode` returned."""
    if "int8" in fields:
        return fields["int8"].to(torch.float32) * fields["int8_scale"][:, None]
    packed = fields["nf4"]
    k = packed.shape[0]
    codes = torch.stack([packed >> 4, packed & 0x0F], dim=2).view(k, -1, BLOCK).long()
    values = NF4_LEVELS[codes] * fields["nf4_absmax"].to(torch.float32)[:, :, None]
    return values.view(k, -1)[:, :width].contiguous()
