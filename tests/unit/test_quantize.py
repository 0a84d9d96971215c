"""Packed components: sizes, round trip, and the error each scheme adds."""

import pytest
import torch

from pipeline.linalg import quantize


def _basis(k: int, d: int) -> torch.Tensor:
    return torch.linalg.qr(
        torch.randn(d, k, generator=torch.Generator().manual_seed(k * d), dtype=torch.float64)
    ).Q.T.float()


@pytest.mark.parametrize("d", [64, 100, 3072])
def test_int8_stores_a_byte_per_value_and_rounds_to_half_a_step(d):
    v = _basis(8, d)
    fields = quantize.encode(v, "int8")
    assert fields["int8"].dtype == torch.int8 and fields["int8"].shape == (8, d) and fields["int8_scale"].shape == (8,)
    decoded = quantize.decode(fields, d)
    step = v.abs().amax(dim=1, keepdim=True) / 127
    assert ((decoded - v).abs() <= step / 2 + 1e-8).all()
    assert float((decoded - v).norm() / v.norm()) < 0.012


@pytest.mark.parametrize("d", [64, 100, 3072])
def test_nf4_packs_two_codes_a_byte_with_a_float16_scale_per_block(d):
    v = _basis(8, d)
    fields = quantize.encode(v, "nf4")
    blocks = -(-d // quantize.BLOCK)
    assert fields["nf4"].dtype == torch.uint8 and fields["nf4"].shape == (8, blocks * quantize.BLOCK // 2)
    assert fields["nf4_absmax"].dtype == torch.float16 and fields["nf4_absmax"].shape == (8, blocks)
    decoded = quantize.decode(fields, d)
    assert decoded.shape == v.shape
    assert float((decoded - v).norm() / v.norm()) < 0.11
    # Every decoded value is a level times its block's scale, and the block maximum is exact.
    assert torch.allclose(decoded.abs().amax(dim=1), v.abs().amax(dim=1), rtol=1e-3)


def test_encoding_what_was_decoded_gives_the_same_codes():
    v = _basis(6, 700)
    for scheme in quantize.SCHEMES:
        fields = quantize.encode(v, scheme)
        again = quantize.encode(quantize.decode(fields, 700), scheme)
        assert all(torch.equal(fields[k], again[k]) for k in fields), scheme


def test_zero_rows_and_bad_arguments():
    zeros = torch.zeros(2, 70)
    for scheme in quantize.SCHEMES:
        assert torch.equal(quantize.decode(quantize.encode(zeros, scheme), 70), zeros)
    with pytest.raises(ValueError, match="unknown quantization"):
        quantize.encode(zeros, "int3")
    with pytest.raises(ValueError, match="bits must be 8"):
        quantize.bits_scheme(2)
