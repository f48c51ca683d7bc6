"""The layer map across model families, and the layer count check."""

from __future__ import annotations

import pytest

from layerswap_fast import MismatchError
from layerswap_fast.plan.layers import classify, count_layers, layer_count_from_config


@pytest.mark.parametrize("name, layer, kind", [
    ("model.embed_tokens.weight", None, "embed"),
    ("model.layers.0.self_attn.q_proj.weight", 0, "q"),
    ("model.layers.31.self_attn.k_proj.weight", 31, "k"),
    ("model.layers.3.self_attn.v_proj.bias", 3, "v"),
    ("model.layers.12.self_attn.o_proj.weight", 12, "o"),
    ("model.layers.3.mlp.gate_proj.weight", 3, "gate"),
    ("model.layers.3.mlp.up_proj.weight", 3, "up"),
    ("model.layers.3.mlp.down_proj.weight", 3, "down"),
    ("model.layers.3.input_layernorm.weight", 3, "norm"),
    ("model.layers.3.self_attn.q_norm.weight", 3, "norm"),
    ("model.norm.weight", None, "norm"),
    ("lm_head.weight", None, "lm_head"),
    ("model.layers.1.block_sparse_moe.experts.3.w1.weight", 1, "gate"),   # Mixtral
    ("model.layers.1.block_sparse_moe.experts.3.w3.weight", 1, "up"),
    ("model.layers.1.block_sparse_moe.experts.3.w2.weight", 1, "down"),
    ("model.layers.1.block_sparse_moe.gate.weight", 1, "other"),          # the router
    ("transformer.h.3.attn.c_attn.weight", 3, "other"),                   # GPT-2 fused qkv
    ("transformer.h.3.attn.c_proj.weight", 3, "o"),
    ("transformer.h.3.mlp.c_fc.weight", 3, "up"),
    ("transformer.h.3.mlp.c_proj.bias", 3, "down"),
    ("transformer.h.3.ln_1.weight", 3, "norm"),
    ("transformer.ln_f.weight", None, "norm"),
    ("transformer.wte.weight", None, "embed"),
    ("gpt_neox.layers.2.attention.dense.weight", 2, "o"),
    ("gpt_neox.layers.2.mlp.dense_h_to_4h.weight", 2, "up"),
    ("gpt_neox.layers.2.mlp.dense_4h_to_h.weight", 2, "down"),
    ("embed_out.weight", None, "lm_head"),
    ("model.decoder.layers.1.fc1.weight", 1, "up"),                       # OPT
    ("model.decoder.layers.1.self_attn_layer_norm.weight", 1, "norm"),
    ("bert.encoder.layer.2.attention.self.query.weight", 2, "q"),         # BERT
    ("bert.encoder.layer.2.attention.output.dense.weight", 2, "o"),
    ("bert.encoder.layer.2.intermediate.dense.weight", 2, "up"),
    ("bert.encoder.layer.2.output.dense.weight", 2, "down"),
    ("bert.encoder.layer.2.output.LayerNorm.weight", 2, "norm"),
    ("transformer.blocks.4.ffn.up_proj.weight", 4, "up"),                 # MPT
])
def test_classify(name: str, layer: int | None, kind: str) -> None:
    info = classify(name)
    assert (info.layer, info.kind) == (layer, kind)


def test_layer_count_aliases() -> None:
    assert layer_count_from_config({"num_hidden_layers": 32}) == 32
    assert layer_count_from_config({"n_layer": 12}) == 12
    assert layer_count_from_config({"text_config": {"num_hidden_layers": 40}}) == 40
    assert layer_count_from_config({}) is None
    assert layer_count_from_config(None) is None


def names(n: int) -> list[str]:
    return ["model.embed_tokens.weight"] + [f"model.layers.{i}.mlp.up_proj.weight" for i in range(n)]


def test_count_layers_checks_config_against_names() -> None:
    assert count_layers(names(4), {"num_hidden_layers": 4}, "m") == 4
    assert count_layers(names(4), None, "m") == 4
    with pytest.raises(MismatchError, match="m: config.json says 5 layers but the tensor names disagree \\(missing layers \\[4\\]\\)"):
        count_layers(names(4), {"num_hidden_layers": 5}, "m")
    with pytest.raises(MismatchError, match="unexpected layers \\[3\\]"):
        count_layers(names(4), {"num_hidden_layers": 3}, "m")
    gappy = [n for n in names(4) if ".2." not in n]
    with pytest.raises(MismatchError, match="names suggest 4 layers .*missing layers \\[2\\]"):
        count_layers(gappy, None, "m")
