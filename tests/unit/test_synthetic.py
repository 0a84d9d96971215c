"""The synthetic collections the demo, tests and benchmark use: seeded, chunkable, and with the
structure each name promises."""

import pytest
import torch
from safetensors.torch import load_file

from pipeline import peft_format
from pipeline.io.location import Location
from pipeline.linalg.decompose import centred_svd
from pipeline.synthetic import PRESETS, generate

MODULE = "model.layers.0.self_attn.q_proj"


def _factors(root, structure, n=12, **kwargs):
    generate(Location(str(root / structure)), n, preset="micro", structure=structure, **kwargs)
    out = []
    for folder in sorted((root / structure).iterdir()):
        weights = load_file(str(folder / peft_format.WEIGHTS_FILE))
        out.append(
            (weights[peft_format.weight_key(MODULE, "A")].float(), weights[peft_format.weight_key(MODULE, "B")].float())
        )
    return out


def test_an_adapter_depends_only_on_its_index(tmp_path):
    whole = _factors(tmp_path / "whole", "shared", n=6)
    generate(Location(str(tmp_path / "chunks")), 3, preset="micro")
    generate(Location(str(tmp_path / "chunks")), 3, preset="micro", start=3)
    for i, folder in enumerate(sorted((tmp_path / "chunks").iterdir())):
        weights = load_file(str(folder / peft_format.WEIGHTS_FILE))
        assert torch.equal(weights[peft_format.weight_key(MODULE, "A")], whole[i][0])


def test_gauge_changes_the_factors_but_not_delta_w(tmp_path):
    shared, gauge = _factors(tmp_path, "shared"), _factors(tmp_path, "gauge")
    for (a, b), (ga, gb) in zip(shared, gauge):
        torch.testing.assert_close(gb @ ga, b @ a, atol=1e-5, rtol=1e-4)
        assert torch.linalg.norm(ga - a) > 0.5 * torch.linalg.norm(a)

    # The factors no longer share a low-dimensional structure: the top 6 components of lora_A
    # explain far less of the gauge collection than of the shared one.
    def explained(pairs):
        dec = centred_svd(torch.stack([a.reshape(-1) for a, _ in pairs]), k=6)
        return float((dec.singular_values.double() ** 2).sum() / dec.total_variance)

    assert explained(gauge) < 0.8 * explained(shared)


def test_same_init_shares_one_lora_a_init_and_grows_b_from_zero(tmp_path):
    pairs = _factors(tmp_path, "same-init")
    a = torch.stack([a for a, _ in pairs])
    b = torch.stack([b for _, b in pairs])
    drift = torch.linalg.norm(a - a.mean(0), dim=(1, 2)) / torch.linalg.norm(a.mean(0))
    assert drift.max() < 0.2  # every A near the common init
    assert a.mean(0).abs().max() <= 1.1 / PRESETS["micro"].modules["q_proj"][0] ** 0.5  # PEFT init bound, plus drift
    # B has no common part: its mean is what averaging 12 independent draws leaves (~1/sqrt(12)).
    assert torch.linalg.norm(b.mean(0)) < 0.5 * torch.linalg.norm(b, dim=(1, 2)).mean()


def test_unknown_structure_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown structure 'random'"):
        generate(Location(str(tmp_path)), 1, structure="random")
