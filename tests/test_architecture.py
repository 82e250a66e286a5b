"""Layer detection from tensor names for each supported family (no weights needed),
inference for unknown architectures, clear errors, and --allow-crimes."""

from __future__ import annotations

import json
import os

import pytest

from dmerge.architecture import layout_of
from dmerge.errors import InputModelError, RecipeError

N = 3  # layers in every name list

ATTN = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight"]
MLP = ["mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]
NORMS = ["input_layernorm.weight", "post_attention_layernorm.weight"]
QKV_BIAS = ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"]
QK_NORM = ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
FF_NORMS = ["pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight"]


def _experts(template: str, n: int = 4) -> list[str]:
    return [template.format(e=e) for e in range(n)]


MIXTRAL = ["block_sparse_moe.gate.weight"] + [
    s for e in range(4) for s in (f"block_sparse_moe.experts.{e}.w1.weight", f"block_sparse_moe.experts.{e}.w2.weight",
                                  f"block_sparse_moe.experts.{e}.w3.weight")]
MIXTRAL_FUSED = ["mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"]  # transformers 5 layout
QWEN_MOE = ["mlp.gate.weight"] + [
    s for e in range(4) for s in (f"mlp.experts.{e}.gate_proj.weight", f"mlp.experts.{e}.up_proj.weight",
                                  f"mlp.experts.{e}.down_proj.weight")]
QWEN2_SHARED = ["mlp.shared_expert.gate_proj.weight", "mlp.shared_expert.up_proj.weight",
                "mlp.shared_expert.down_proj.weight", "mlp.shared_expert_gate.weight"]


def llama_style(per_layer: list[str], head: bool = True) -> list[str]:
    names = ["model.embed_tokens.weight"]
    for i in range(N):
        names += [f"model.layers.{i}.{s}" for s in per_layer]
    names.append("model.norm.weight")
    if head:
        names.append("lm_head.weight")
    return names


GPT2_LAYER = ["ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
              "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight",
              "mlp.c_proj.bias"]


def gpt2_names(prefix: str = "transformer.") -> list[str]:
    names = [f"{prefix}wte.weight", f"{prefix}wpe.weight"]
    for i in range(N):
        names += [f"{prefix}h.{i}.{s}" for s in GPT2_LAYER]
    return names + [f"{prefix}ln_f.weight", f"{prefix}ln_f.bias"]


NEOX_LAYER = ["input_layernorm.weight", "input_layernorm.bias", "post_attention_layernorm.weight",
              "post_attention_layernorm.bias", "attention.query_key_value.weight", "attention.query_key_value.bias",
              "attention.dense.weight", "attention.dense.bias", "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias",
              "mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias"]


def neox_names() -> list[str]:
    names = ["gpt_neox.embed_in.weight"]
    for i in range(N):
        names += [f"gpt_neox.layers.{i}.{s}" for s in NEOX_LAYER]
    return names + ["gpt_neox.final_layer_norm.weight", "gpt_neox.final_layer_norm.bias", "embed_out.weight"]


LLAMA_PRE = ["model.embed_tokens.weight"]
CASES = {
    # family: (architectures, model_type, names, per-layer suffixes, pre, post, embedding, head)
    "llama": ("LlamaForCausalLM", "llama", llama_style(NORMS + ATTN + MLP), NORMS + ATTN + MLP,
              LLAMA_PRE, ["model.norm.weight", "lm_head.weight"], "model.embed_tokens.weight", "lm_head.weight"),
    "mistral": ("MistralForCausalLM", "mistral", llama_style(NORMS + ATTN + MLP), NORMS + ATTN + MLP,
                LLAMA_PRE, ["model.norm.weight", "lm_head.weight"], "model.embed_tokens.weight", "lm_head.weight"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2", llama_style(NORMS + ATTN + QKV_BIAS + MLP, head=False),
              NORMS + ATTN + QKV_BIAS + MLP, LLAMA_PRE, ["model.norm.weight"], "model.embed_tokens.weight", None),
    "qwen3": ("Qwen3ForCausalLM", "qwen3", llama_style(NORMS + ATTN + QK_NORM + MLP), NORMS + ATTN + QK_NORM + MLP,
              LLAMA_PRE, ["model.norm.weight", "lm_head.weight"], "model.embed_tokens.weight", "lm_head.weight"),
    "gemma": ("GemmaForCausalLM", "gemma", llama_style(NORMS + ATTN + MLP, head=False), NORMS + ATTN + MLP,
              LLAMA_PRE, ["model.norm.weight"], "model.embed_tokens.weight", None),
    "gemma2": ("Gemma2ForCausalLM", "gemma2", llama_style(NORMS + FF_NORMS + ATTN + MLP, head=False),
               NORMS + FF_NORMS + ATTN + MLP, LLAMA_PRE, ["model.norm.weight"], "model.embed_tokens.weight", None),
    "gemma3_text": ("Gemma3ForCausalLM", "gemma3_text", llama_style(NORMS + FF_NORMS + ATTN + QK_NORM + MLP, head=False),
                    NORMS + FF_NORMS + ATTN + QK_NORM + MLP, LLAMA_PRE, ["model.norm.weight"],
                    "model.embed_tokens.weight", None),
    "phi3": ("Phi3ForCausalLM", "phi3",
             llama_style(NORMS + ["self_attn.qkv_proj.weight", "self_attn.o_proj.weight", "mlp.gate_up_proj.weight",
                                  "mlp.down_proj.weight"]),
             NORMS + ["self_attn.qkv_proj.weight", "self_attn.o_proj.weight", "mlp.gate_up_proj.weight",
                      "mlp.down_proj.weight"],
             LLAMA_PRE, ["model.norm.weight", "lm_head.weight"], "model.embed_tokens.weight", "lm_head.weight"),
    "mixtral": ("MixtralForCausalLM", "mixtral", llama_style(NORMS + ATTN + MIXTRAL), NORMS + ATTN + MIXTRAL,
                LLAMA_PRE, ["model.norm.weight", "lm_head.weight"], "model.embed_tokens.weight", "lm_head.weight"),
    "mixtral-fused": ("MixtralForCausalLM", "mixtral", llama_style(NORMS + ATTN + MIXTRAL_FUSED),
                      NORMS + ATTN + MIXTRAL_FUSED, LLAMA_PRE, ["model.norm.weight", "lm_head.weight"],
                      "model.embed_tokens.weight", "lm_head.weight"),
    "qwen2_moe": ("Qwen2MoeForCausalLM", "qwen2_moe", llama_style(NORMS + ATTN + QKV_BIAS + QWEN_MOE + QWEN2_SHARED),
                  NORMS + ATTN + QKV_BIAS + QWEN_MOE + QWEN2_SHARED, LLAMA_PRE,
                  ["model.norm.weight", "lm_head.weight"], "model.embed_tokens.weight", "lm_head.weight"),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "qwen3_moe", llama_style(NORMS + ATTN + QK_NORM + QWEN_MOE),
                  NORMS + ATTN + QK_NORM + QWEN_MOE, LLAMA_PRE, ["model.norm.weight", "lm_head.weight"],
                  "model.embed_tokens.weight", "lm_head.weight"),
    "gpt2": ("GPT2LMHeadModel", "gpt2", gpt2_names(), GPT2_LAYER, ["transformer.wte.weight", "transformer.wpe.weight"],
             ["transformer.ln_f.weight", "transformer.ln_f.bias"], "transformer.wte.weight", None),
    "gpt2-bare": ("GPT2LMHeadModel", "gpt2", gpt2_names(""), GPT2_LAYER, ["wte.weight", "wpe.weight"],
                  ["ln_f.weight", "ln_f.bias"], "wte.weight", None),
    "gpt_neox": ("GPTNeoXForCausalLM", "gpt_neox", neox_names(), NEOX_LAYER, ["gpt_neox.embed_in.weight"],
                 ["gpt_neox.final_layer_norm.weight", "gpt_neox.final_layer_norm.bias", "embed_out.weight"],
                 "gpt_neox.embed_in.weight", "embed_out.weight"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_family_layout(case):
    arch, model_type, names, per_layer, pre, post, embedding, head = CASES[case]
    config = {"architectures": [arch], "model_type": model_type}
    lay = layout_of(names, "m", config, declared_layers=N)
    assert lay.family.name == case.split("-")[0] and not lay.family.inferred
    assert lay.num_layers == N
    for i in range(N):
        assert [ln.suffix for ln in lay.layers[i]] == per_layer, i
        assert all(ln.index == i and ln.name in names for ln in lay.layers[i])
    assert lay.pre == pre and lay.post == post
    assert lay.embedding == embedding and lay.head == head
    assert lay.vocab == {n for n in (embedding, head) if n}
    # the head a tied checkpoint would have (stand-in target for lm_head)
    assert lay.head_name == (head or ("lm_head.weight" if case not in ("gpt_neox",) else "embed_out.weight"))
    # layer count checked against config
    with pytest.raises(InputModelError, match="declares 5 layers"):
        layout_of(names, "m", config, declared_layers=5)


def test_moe_expert_index_stays_in_suffix():
    arch, model_type, names, *_ = CASES["mixtral"]
    lay = layout_of(names, "m", {"architectures": [arch]})
    assert "block_sparse_moe.experts.3.w2.weight" in [ln.suffix for ln in lay.layers[2]]
    assert lay.layers[2][0].renumbered(7).startswith("model.layers.7.")


def test_unknown_architecture_is_inferred():
    names = ["backbone.embeddings.weight"]
    for i in range(4):
        names += [f"backbone.blocks.{i}.mixer.in_proj.weight", f"backbone.blocks.{i}.norm.weight"]
    names += ["backbone.norm_f.weight", "lm_head.weight"]
    shapes = {n: ((50, 8) if n in ("backbone.embeddings.weight", "lm_head.weight") else (8, 8)) for n in names}
    lay = layout_of(shapes, "m", {"architectures": ["FooMambaForCausalLM"], "n_layer": 4, "vocab_size": 50})
    assert lay.family.inferred and lay.family.layers_key == "n_layer"
    assert lay.num_layers == 4 and lay.layer_prefix == "backbone.blocks"
    assert lay.pre == ["backbone.embeddings.weight"]
    assert lay.post == ["backbone.norm_f.weight", "lm_head.weight"]
    assert lay.embedding == "backbone.embeddings.weight" and lay.head == "lm_head.weight"


def test_known_config_with_unexpected_names_falls_back_to_inference():
    names = ["language_model.embed_tokens.weight", "language_model.decoder.0.w.weight",
             "language_model.decoder.1.w.weight", "language_model.norm.weight"]
    lay = layout_of(names, "m", {"architectures": ["LlamaForCausalLM"]})
    assert lay.family.inferred and lay.num_layers == 2 and lay.pre == ["language_model.embed_tokens.weight"]


def test_undetectable_layers_error():
    with pytest.raises(InputModelError, match="cannot find the decoder layers of WeirdModel"):
        layout_of(["embed.weight", "proj.weight", "head.weight"], "m", {"architectures": ["WeirdModel"]})
    two_stacks = ["encoder.layers.0.w", "encoder.layers.1.w", "decoder.layers.0.w", "shared.weight"]
    with pytest.raises(InputModelError, match="several stacks of numbered tensors.*decoder.layers.N.*encoder.layers.N"):
        layout_of(two_stacks, "m", {"architectures": ["T5Like"]})


def test_missing_layer_error():
    names = llama_style(NORMS)
    names = [n for n in names if ".layers.1." not in n]
    with pytest.raises(InputModelError, match="no tensors found for layer 1"):
        layout_of(names, "m", {"architectures": ["LlamaForCausalLM"]})


# ---------------------------------------------------------------------------------------
# Mixing architectures needs --allow-crimes


@pytest.fixture(scope="module")
def llama_and_mistral(tmp_path_factory):
    from dmerge.toymodels import LlamaShape, random_weights, write_model

    root = tmp_path_factory.mktemp("crimes")
    shape = LlamaShape(hidden=32, layers=2, intermediate=64, heads=4, kv_heads=2, vocab=64)
    a = write_model(str(root / "llama"), random_weights(shape, 1), shape.config("bfloat16"))
    cfg = dict(shape.config("bfloat16"), architectures=["MistralForCausalLM"], model_type="mistral")
    b = write_model(str(root / "mistral"), random_weights(shape, 2), cfg)
    recipe = root / "r.yml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n"
                      f"  - model: {b}\n    parameters: {{weight: 0.5}}\n")
    return str(recipe)


def test_mixing_architectures_needs_allow_crimes(llama_and_mistral, tmp_path):
    from click.testing import CliRunner

    from dmerge.cli import main
    from dmerge.plan import build_plan
    from dmerge.recipe import load_recipe

    with pytest.raises(RecipeError, match="mix architectures.*llama.*mistral.*--allow-crimes"):
        build_plan(load_recipe(llama_and_mistral))
    plan = build_plan(load_recipe(llama_and_mistral, allow_crimes=True))
    assert plan.architecture == "llama + mistral"

    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", llama_and_mistral, str(out), "-q"])
    assert result.exit_code == 1 and "--allow-crimes" in result.output and not out.exists()
    result = CliRunner().invoke(main, ["run", llama_and_mistral, str(out), "-q", "--allow-crimes"])
    assert result.exit_code == 0, result.output
    assert json.load(open(os.path.join(out, "config.json")))["architectures"] == ["LlamaForCausalLM"]
