"""Tokenizer merges: tokenizer_source base | union | <model>, the tokenizer: block
(tokens with source/force, pad_to_multiple_of), chat_template; embedding and lm_head
rows re-indexed as mergekit does, byte-identical whatever the chunking."""

from __future__ import annotations

import contextlib
import json
import os

import pytest
import torch

from conftest import compare_with_mergekit, load_folder, run_merge, shard_bytes, write_recipe
from dmerge.numerics import round_to
from dmerge.toymodels import LlamaShape, random_weights, write_model, write_wordlevel_tokenizer

transformers = pytest.importorskip("transformers")

WORDS = [f"w{i}" for i in range(40)]
TOKENIZERS = {
    # name: (words, special added tokens, plain added tokens, extra embedding rows)
    "TA": (WORDS, ["<|im_start|>", "<|im_end|>"], [], 0),
    "TB": (WORDS + ["banana", "cherry", "kiwi"], ["<tool>"], ["<extra>"], 0),
    "TC": (WORDS + ["banana", "kiwi", "mango"], ["<tool>", "<|im_end|>"], [], 2),
}
EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"


@pytest.fixture(scope="module")
def tz(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tok")
    out = {}
    for i, (name, (words, special, added, extra)) in enumerate(TOKENIZERS.items()):
        vocab = 3 + len(words) + len(special) + len(added) + extra
        shape = LlamaShape(hidden=32, layers=4, intermediate=64, heads=4, kv_heads=2, vocab=vocab)
        folder = write_model(str(root / name), random_weights(shape, 20 + i), shape.config("bfloat16"))
        write_wordlevel_tokenizer(folder, words, special, added)
        out[name] = folder
    return out


def vocab_of(folder: str) -> dict[str, int]:
    return transformers.AutoTokenizer.from_pretrained(folder).get_vocab()


def test_union_vocabulary_and_rows(tz, tmp_path):
    text = f"""
merge_method: linear
base_model: {tz['TA']}
models:
  - model: {tz['TA']}
    parameters: {{weight: 1.0}}
  - model: {tz['TB']}
    parameters: {{weight: 1.0}}
tokenizer_source: union
dtype: bfloat16
"""
    out = str(tmp_path / "out")
    run_merge(write_recipe(tmp_path / "r.yml", text), out)
    va, vb = vocab_of(tz["TA"]), vocab_of(tz["TB"])
    tok = transformers.AutoTokenizer.from_pretrained(out)
    expected = dict(va)
    for t in ["banana", "cherry", "kiwi", "<tool>", "<extra>"]:  # B's tokens in B's id order
        expected[t] = len(expected)
    assert tok.get_vocab() == expected
    specials = {i.content for i in tok.added_tokens_decoder.values() if i.special}
    assert {"<tool>", "<|im_start|>", "<|im_end|>"} <= specials and "<extra>" not in specials
    assert tok("w1 banana <tool> <|im_end|>").input_ids == [4, 45, 48, 44]
    assert json.load(open(os.path.join(out, "config.json")))["vocab_size"] == 50

    ours = load_folder(out)
    a, b = load_folder(tz["TA"]), load_folder(tz["TB"])
    for name in (EMB, HEAD):
        assert ours[name].shape == (50, 32)
        for t, i in expected.items():
            if t in va and t in vb:
                want = round_to((a[name][va[t]].double() + b[name][vb[t]].double()) / 2, torch.bfloat16)
            else:
                want = a[name][va[t]] if t in va else b[name][vb[t]]
            assert torch.equal(ours[name][i], want), (name, t)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    logits = model(torch.tensor([tok("w1 banana <tool>").input_ids])).logits
    assert logits.shape == (1, 3, 50) and bool(torch.isfinite(logits).all())


TOKENS_RECIPE = """
merge_method: linear
base_model: {TA}
models:
  - model: {TA}
    parameters: {{weight: 0.4}}
  - model: {TB}
    parameters: {{weight: 0.3}}
  - model: {TC}
    parameters: {{weight: 0.3}}
tokenizer:
  source: union
  pad_to_multiple_of: 16
  tokens:
    banana:
      source: {{kind: model_token, model: {TA}, token: w3}}
      force: true
    <tool>:
      source: {{kind: zero}}
      force: true
    newtok:
      source: {{kind: model_token, model: {TC}, token_id: 5}}
    mango:
      source: {TC}
      force: true
dtype: bfloat16
"""


def _aligned(ours: dict, theirs: dict, vo: dict, vt: dict) -> tuple[dict, dict]:
    """Both outputs with vocabulary rows in one order (token strings; then padding)."""
    order = sorted(vo)
    a, b = dict(ours), dict(theirs)
    for name in (EMB, HEAD):
        pad_a, pad_b = ours[name][len(vo):], theirs[name][len(vt):]
        a[name] = torch.cat([torch.stack([ours[name][vo[t]] for t in order]), pad_a])
        b[name] = torch.cat([torch.stack([theirs[name][vt[t]] for t in order]), pad_b])
    return a, b


def test_tokens_block_and_padding_match_mergekit(tz, tmp_path):
    from mergekit_oracle import run_mergekit

    text = TOKENS_RECIPE.format(**tz)
    out = str(tmp_path / "out")
    run_merge(write_recipe(tmp_path / "r.yml", text), out)
    run_mergekit(text, str(tmp_path / "mk"))
    vo, vt = vocab_of(out), vocab_of(str(tmp_path / "mk"))
    assert vo.keys() == vt.keys() and len(vo) == 52
    cfg_o = json.load(open(os.path.join(out, "config.json")))
    cfg_t = json.load(open(tmp_path / "mk" / "config.json"))
    assert cfg_o["vocab_size"] == cfg_t["vocab_size"] == 64
    ours, theirs = load_folder(out), load_folder(str(tmp_path / "mk"))
    assert ours[EMB].shape == theirs[EMB].shape == (64, 32)

    # the token overrides, checked directly
    a, c = load_folder(tz["TA"]), load_folder(tz["TC"])
    va, vc = vocab_of(tz["TA"]), vocab_of(tz["TC"])
    assert torch.equal(ours[EMB][vo["<tool>"]], torch.zeros(32, dtype=torch.bfloat16))
    assert torch.equal(ours[EMB][vo["banana"]], a[EMB][va["w3"]])  # forced: every parent uses it
    assert torch.equal(ours[EMB][vo["newtok"]], c[EMB][5])
    assert torch.equal(ours[EMB][vo["mango"]], c[EMB][vc["mango"]])

    ours_al, theirs_al = _aligned(ours, theirs, vo, vt)
    parents = {k: load_folder(v) for k, v in tz.items()}

    w = {"TA": 0.4, "TB": 0.3, "TC": 0.3}
    vocabs = {k: vocab_of(v) for k, v in tz.items()}

    def reference(name):  # float64 value where mergekit's float32 arithmetic may be off
        if name not in (EMB, HEAD):
            return sum(w[k] * parents[k][name].double() for k in w)
        # rows of tokens every parent has (own rows merged); others are copies, zeros or
        # means of copies: those must agree with mergekit within one step
        ref = torch.full_like(ours_al[name], float("nan"), dtype=torch.float64)
        for i, tok in enumerate(sorted(vo)):
            if all(tok in v for v in vocabs.values()) and tok != "banana":
                ref[i] = sum(w[k] * parents[k][name][vocabs[k][tok]].double() for k in w)
        return ref

    compare_with_mergekit(ours_al, theirs_al, reference)


def test_vocab_rows_independent_of_chunking(tz, tmp_path):
    recipe = write_recipe(tmp_path / "r.yml", TOKENS_RECIPE.format(**tz))
    run_merge(recipe, str(tmp_path / "one"), "--out-shard-size", "40K")
    run_merge(recipe, str(tmp_path / "two"), "--out-shard-size", "40K", "--chunk-size", "1K")
    run_merge(recipe, str(tmp_path / "three"), "--out-shard-size", "40K", "--chunk-size", "10K", "--workers", "2",
              "--processes")
    one = shard_bytes(str(tmp_path / "one"))
    assert len(one) > 1
    assert one == shard_bytes(str(tmp_path / "two")) == shard_bytes(str(tmp_path / "three"))


def test_frankenmerge_with_union_tokenizer_matches_mergekit_bytes(tz, tmp_path):
    """Embeddings from the first slice's model, lm_head from the last's, each re-indexed
    (rows of tokens that model lacks are zeros, as in mergekit): a byte copy."""
    from mergekit_oracle import run_mergekit

    text = f"""
merge_method: passthrough
base_model: {tz['TA']}
slices:
  - sources: [{{model: {tz['TA']}, layer_range: [0, 2]}}]
  - sources: [{{model: {tz['TB']}, layer_range: [2, 4]}}]
tokenizer_source: union
dtype: bfloat16
"""
    out = str(tmp_path / "out")
    run_merge(write_recipe(tmp_path / "r.yml", text), out, "--chunk-size", "1K")
    run_mergekit(text, str(tmp_path / "mk"), dtype="bfloat16", out_dtype=None)
    vo, vt = vocab_of(out), vocab_of(str(tmp_path / "mk"))
    ours, theirs = _aligned(load_folder(out), load_folder(str(tmp_path / "mk")), vo, vt)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name].view(torch.int16), theirs[name].view(torch.int16)), name
    b, vb = load_folder(tz["TB"]), vocab_of(tz["TB"])
    raw = load_folder(out)
    assert torch.equal(raw[HEAD][vo["kiwi"]], b[HEAD][vb["kiwi"]])
    assert not bool(raw[HEAD][vo["<|im_start|>"]].any()) and not bool(raw[EMB][vo["kiwi"]].any())


def test_tokenizer_source_base_with_different_vocab_sizes(tz, tmp_path):
    text = f"""
merge_method: linear
base_model: {tz['TA']}
models:
  - model: {tz['TA']}
    parameters: {{weight: 0.5}}
  - model: {tz['TC']}
    parameters: {{weight: 0.5}}
dtype: bfloat16
"""
    from dmerge.errors import InputModelError
    from dmerge.plan import build_plan
    from dmerge.recipe import load_recipe

    with pytest.raises(InputModelError, match="model.embed_tokens.weight: shape mismatch.*set tokenizer_source"):
        build_plan(load_recipe(write_recipe(tmp_path / "bad.yml", text)))
    out = str(tmp_path / "out")
    run_merge(write_recipe(tmp_path / "r.yml", text + "tokenizer_source: base\n"), out)
    ours = load_folder(out)
    va, vc = vocab_of(tz["TA"]), vocab_of(tz["TC"])
    assert vocab_of(out) == va and ours[EMB].shape == (45, 32)
    a, c = load_folder(tz["TA"]), load_folder(tz["TC"])
    for t in ["w7", "<|im_end|>"]:  # both have it (at different ids for <|im_end|>): averaged
        want = round_to((a[EMB][va[t]].double() + c[EMB][vc[t]].double()) / 2, torch.bfloat16)
        assert torch.equal(ours[EMB][va[t]], want), t
    assert torch.equal(ours[EMB][va["<|im_start|>"]], a[EMB][va["<|im_start|>"]])  # only A: A's row
    assert json.load(open(os.path.join(out, "config.json")))["vocab_size"] == 45


def test_tokenizer_source_model_and_chat_template(tz, tmp_path):
    text = f"""
merge_method: passthrough
models:
  - model: {tz['TA']}
tokenizer_source: {tz['TB']}
chat_template: chatml
"""
    out = str(tmp_path / "out")
    run_merge(write_recipe(tmp_path / "r.yml", text), out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.get_vocab() == vocab_of(tz["TB"])
    msgs = [{"role": "user", "content": "w1 w2"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        "<|im_start|>user\nw1 w2<|im_end|>\n<|im_start|>assistant\n"
    ours, a = load_folder(out), load_folder(tz["TA"])
    va, vb = vocab_of(tz["TA"]), vocab_of(tz["TB"])
    assert torch.equal(ours[EMB][vb["w5"]], a[EMB][va["w5"]]) and not bool(ours[EMB][vb["banana"]].any())


def test_chat_template_on_copied_tokenizer_and_errors(tz, tmp_path):
    from dmerge.errors import RecipeError
    from dmerge.plan import build_plan
    from dmerge.recipe import load_recipe

    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\\n{% endfor %}"  # a YAML escape
    text = f"merge_method: passthrough\nmodels:\n  - model: {tz['TA']}\nchat_template: \"{template}\"\n"
    out = str(tmp_path / "out")
    run_merge(write_recipe(tmp_path / "r.yml", text), out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "[user] hi\n"
    bad = f"merge_method: passthrough\nmodels:\n  - model: {tz['TA']}\nchat_template: nosuchtemplate\n"
    with pytest.raises(RecipeError, match="chat_template: 'nosuchtemplate' is neither a built-in"):
        build_plan(load_recipe(write_recipe(tmp_path / "bad.yml", bad)))
    bad_tok = (f"merge_method: passthrough\nmodels:\n  - model: {tz['TA']}\n"
               "tokenizer:\n  tokens:\n    foo: {source: {kind: model_token, model: x}}\n")
    with pytest.raises(RecipeError, match="exactly one of token or token_id"):
        load_recipe(write_recipe(tmp_path / "bad2.yml", bad_tok))


def test_tokens_beyond_vocab_size_are_dropped(tz, tmp_path):
    """A tokenizer with more tokens than the model has rows: the extra ones are dropped
    from the base vocabulary (and not taken from other parents), as in mergekit."""
    from dmerge.plan import build_plan
    from dmerge.recipe import load_recipe

    shape = LlamaShape(hidden=32, layers=4, intermediate=64, heads=4, kv_heads=2, vocab=44)
    short = write_model(str(tmp_path / "short"), random_weights(shape, 30), shape.config("bfloat16"))
    write_wordlevel_tokenizer(short, WORDS + ["extra1", "extra2"], [], [])  # 45 tokens, 44 rows
    for source, base, other in (("base", short, tz["TA"]), ("union", tz["TA"], short)):
        text = (f"merge_method: linear\nbase_model: {base}\nmodels:\n  - model: {base}\n    parameters: {{weight: 1}}\n"
                f"  - model: {other}\n    parameters: {{weight: 1}}\ntokenizer_source: {source}\n")
        with pytest.warns(UserWarning, match="extra2") if source == "union" else contextlib.nullcontext():
            plan = build_plan(load_recipe(write_recipe(tmp_path / f"{source}.yml", text)))
        vocab = plan.tokenizer.vocab
        assert "extra2" not in vocab and "extra1" in vocab
        assert plan.out_config["vocab_size"] == len(vocab) == (44 if source == "base" else 46)
        emb = next(t for t in plan.tensors if t.name == EMB)
        assert emb.shape == (len(vocab), 32)
