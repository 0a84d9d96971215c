"""The report's axis labels keep a module's layer number however short they must be."""

from pipeline.operations.report import module_label

NAME = "base_model.model.model.layers.12.self_attn.q_proj"


def test_module_labels_keep_the_layer_number():
    assert module_label(NAME, 30) == "12.self_attn.q_proj"
    assert module_label(NAME, 10) == "12.q_proj"
    assert module_label(NAME, 6) == "12.q_p"
    assert module_label("model.layers.3.mlp.experts.7.w1", 10) == "3.7.w1"
    assert module_label("lm_head", 5) == "_head"  # no layer number: the name's end
