"""Residual math (pipeline.linalg.residual) and the bound's configuration."""

import math

import pytest
import torch

from pipeline.config import NO_BOUND, ComponentRule, Options, parse_max_error
from pipeline.io.format import read_parameters, write_parameters
from pipeline.linalg.residual import MARGIN, difference_svd, error_of, fit_residual, with_residual


def _factors(gen, r, d_in=24, d_out=20):
    return torch.randn(r, d_in, generator=gen, dtype=torch.float64), torch.randn(
        d_out, r, generator=gen, dtype=torch.float64
    )


def test_difference_svd_is_the_svd_of_the_difference():
    gen = torch.Generator().manual_seed(0)
    a1, b1 = _factors(gen, 4)
    a2, b2 = _factors(gen, 3)
    u, s, vh = difference_svd(a1, b1, a2, b2)
    difference = b1 @ a1 - b2 @ a2
    torch.testing.assert_close(u @ torch.diag(s) @ vh, difference, atol=1e-10, rtol=0)
    torch.testing.assert_close(s[:7], torch.linalg.svdvals(difference)[:7], atol=1e-10, rtol=0)
    assert error_of(a1, b1, a2, b2) == pytest.approx(float(torch.linalg.norm(difference) / torch.linalg.norm(b1 @ a1)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_residual_is_the_smallest_within_the_bound_once_cast(dtype):
    gen = torch.Generator().manual_seed(1)
    a, b = _factors(gen, 8)
    shared = (a[:3].to(dtype).double(), b[:, :3].to(dtype).double())  # misses five of eight directions
    shared_error = error_of(a, b, *shared)
    for bound in (0.5 * shared_error, 0.2 * shared_error):
        residual = fit_residual((a, b), shared, 8, dtype, bound, shared_error)
        assert residual.kind == "add" and residual.error <= bound * (1 - MARGIN)
        assert torch.equal(residual.a, residual.a.to(dtype).float())  # values of the adapter's dtype
        written = with_residual(shared, "add", residual.a.double(), residual.b.double())
        assert error_of(a, b, *written) == pytest.approx(residual.error, abs=1e-12)
        if residual.rank > 1:  # one rank less misses the bound
            smaller = fit_residual((a, b), shared, residual.rank, dtype, bound, shared_error)
            assert smaller.kind == "exact"


def test_a_residual_as_large_as_the_adapter_keeps_its_own_factors():
    gen = torch.Generator().manual_seed(2)
    a, b = (x.float().double() for x in _factors(gen, 4))  # as read from a float32 file
    a = torch.cat([a, torch.zeros(4, a.shape[1], dtype=torch.float64)])  # rank 4, padded to 8
    b = torch.cat([b, torch.zeros(b.shape[0], 4, dtype=torch.float64)], dim=1)
    shared = (torch.zeros_like(a), torch.zeros_like(b))
    residual = fit_residual((a, b), shared, 4, torch.float32, 0.0, 1.0)
    assert residual.kind == "exact" and residual.rank == 4 and residual.error == 0.0
    assert torch.equal(residual.a.double(), a[:4]) and torch.equal(residual.b.double(), b[:, :4])


def test_max_error_values():
    assert parse_max_error("0.05") == 0.05 and parse_max_error(0.1) == 0.1 and parse_max_error(None) is None
    assert parse_max_error("none") == parse_max_error(" None ") == NO_BOUND == math.inf
    with pytest.raises(ValueError):
        parse_max_error("tight")
    assert Options(max_error=NO_BOUND).bound is None and Options(max_error=0.0).bound == 0.0
    assert Options(max_error=NO_BOUND).problems() == []
    assert Options(max_error=-1.0).problems() == ["max_error must be at least 0, got -1.0"]


def test_the_stored_bound_carries_over_unless_the_run_gives_one():
    stored = write_parameters(Options(ComponentRule(4), max_error=0.05))
    assert stored["max_error"] == 0.05
    assert "max_error" not in write_parameters(Options(ComponentRule(4), max_error=NO_BOUND))
    assert read_parameters(stored).max_error == 0.05
    assert read_parameters(stored, Options(strict=True)).max_error == 0.05
    assert read_parameters(stored, Options(max_error=0.2)).max_error == 0.2
    assert read_parameters(stored, Options(max_error=NO_BOUND)).bound is None


def test_job_configs_take_the_bound_or_none():
    from pipeline.errors import PipelineError
    from pipeline.jobspec import load, options

    compress = load("compress", None, ["source=a", "store=b", "components=4", "max_error=0.05"])
    assert options("compress", compress) == Options(ComponentRule(4), max_error=0.05)
    rebase = load("rebase", None, ["source=a", "store=b", "max_error=none"])
    assert options("rebase", rebase).max_error == NO_BOUND and options("rebase", rebase).bound is None
    assert options("rebase", load("rebase", None, ["source=a", "store=b"])).max_error is None  # the store's
    with pytest.raises(PipelineError, match="max_error' must be a number, got str 'tight'"):
        load("compress", None, ["source=a", "store=b", "max_error=tight"])
