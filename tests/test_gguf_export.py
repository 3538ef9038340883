"""GGUF export, verified by llama.cpp itself (llama-cpp-python 0.3.36, which CI installs).

Every exportable layout: a tiny float32 checkpoint is exported, llama.cpp loads the file and decodes
greedily from the same prompt ids; its 20 tokens must equal moekit's and, for F16, its logits must
be within 1e-2 of moekit's float32 logits (max |diff| / max |logit|). BF16, Q8_0 and Q4_0 files are
compared with moekit computing on the same rounded weights (the file's own tensor types, round-tripped
through gguf-py), since the rest of the difference is llama.cpp rounding its activations (below).
Refusals need no llama.cpp: they are checked on the config, before anything is written.
"""

import copy
import json
import logging

import numpy as np
import pytest
import torch

import moekit
from moekit.cli import main as cli_main
from moekit.weights.gguf_export import GGUFExportError, export_checkpoint, export_gguf, target, tensor_type
from tests.familyref.checkpoints import make_checkpoint
from tests.tokfixtures import write_hf_bpe, write_sentencepiece, write_xverse

gguf = pytest.importorskip("gguf", reason="gguf-py is a moekit dependency (pip install -e .)")

CHAT = "{% for m in messages %}{{ m.role + ': ' + m.content + '\\n' }}{% endfor %}"
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")

# id: (family, make_checkpoint variant, tokenizer files, llama.cpp architecture). Widths are multiples of
# 32 so that Q8_0 / Q4_0 blocks fit every matrix (others fall back to F16, tested on their own).
CASES = {
    "mixtral": ("mixtral", {"intermediate_size": 64}, "spm", "llama"),
    "orion-rmsnorm": ("orion", {"intermediate_size": 64, "norm": "rms"}, "spm", "llama"),
    "deepseek": ("deepseek", {"moe_intermediate_size": 32, "intermediate_size": 64}, "gpt2", "deepseek"),
    "qwen2_moe": ("qwen2_moe", {"moe_intermediate_size": 32, "shared_expert_intermediate_size": 64,
                                    "intermediate_size": 64}, "qwen2", "qwen2moe"),
    "xverse": ("xverse", {}, "xverse", "bailingmoe"),
    "xverse-linear-rope": ("xverse", {"rope_scaling": {"type": "linear", "factor": 2.0}}, "xverse", "bailingmoe"),
    "llama_moe-linear-gate": ("llama_moe", {"gate_network": "linear", "intermediate_size": 128, "fmt": "safetensors"},
                              "spm", "bailingmoe"),
    "llama-tied": ("llama", {"tie_word_embeddings": True}, "gpt2", "llama"),
}
PROMPT = [5, 17, 99, 200, 31, 7, 64, 300, 12, 250]
STEPS = 20
# BF16 / Q8_0 / Q4_0 against moekit on the same rounded weights. What is left is llama.cpp rounding the
# activations before each matmul: to BF16 (8-bit mantissa) for BF16 weights, to Q8_0 (blocks of 32,
# one 8-bit step = 1/254 of the block's range) for Q8_0 and Q4_0 weights, over every layer. Measured
# here: <= 1% (bf16), <= 2% (q8_0, q4_0) of the largest logit. That noise also moves the router logits
# (O(0.6) here) by ~1e-2, so where moekit's k-th and (k+1)-th router logits are closer than FLIP in
# some layer, llama.cpp may pick the other expert; that position then differs by up to ~30%, and later
# ones a little through attention. So: every position before the first near-tie within tolerance, and
# the median position within tolerance.
TOLERANCE = {"f16": 1e-2, "bf16": 2e-2, "q8_0": 3e-2, "q4_0": 3e-2}
FLIP = 0.02


def _write_tokenizer(kind: str, folder) -> None:
    if kind == "spm":
        write_sentencepiece(folder, vocab_size=400, chat_template=CHAT)
    elif kind == "xverse":
        write_xverse(folder, vocab_size=500)
    else:
        write_hf_bpe(folder, vocab_size=400, byte_level=True)
    if kind == "qwen2":  # Qwen2's own pre-tokenizer: its Split regex, then the byte-level mapping
        spec = json.loads((folder / "tokenizer.json").read_text())
        spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}
        (folder / "tokenizer.json").write_text(json.dumps(spec))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """{case: (folder, float32 model)}: checkpoint, tokenizer files and the model moekit runs."""
    cache = {}

    def get(case):
        if case not in cache:
            family, variant, tok, _ = CASES[case]
            folder = tmp_path_factory.mktemp(case)
            make_checkpoint(family, folder, seed=3, vocab_size=512, dtype="float32", **variant)
            _write_tokenizer(tok, folder)
            model = moekit.load(folder, dtype="float32", kernels="reference")
            with torch.no_grad():  # decisive logits (std ~2.5), so greedy decoding is not decided by rounding
                model.output_weight.mul_(4)
            cache[case] = (folder, model)
        return cache[case]

    return get


@pytest.fixture(scope="module")
def exported(built, tmp_path_factory):
    """{(case, type): path of the GGUF file}."""
    cache = {}

    def get(case, qtype):
        if (case, qtype) not in cache:
            folder, model = built(case)
            out = tmp_path_factory.mktemp("gguf") / f"{case}-{qtype}.gguf"
            cache[case, qtype] = export_gguf(model, out, qtype, tokenizer=folder, progress=False)
        return cache[case, qtype]

    return get


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama.cpp verifies the files: pip install "
                               "llama-cpp-python==0.3.36 (.ci/run does; it compiles llama.cpp, minutes)")


def run_llama(llama_cpp, path, prompt, steps=STEPS):
    """llama.cpp's greedy tokens and the logits of every position it evaluated."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, n_threads=2, verbose=False)
    try:
        llm.eval(prompt)
        tokens = []
        for _ in range(steps):
            tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([tokens[-1]])
        return tokens, np.array(llm.scores[:llm.n_tokens])
    finally:
        llm.close()


@torch.no_grad()
def greedy(model, prompt, steps=STEPS):
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@torch.no_grad()
def logits(model, ids):
    return model(torch.tensor([ids]))[0].numpy()


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def arch_of(path):
    field = gguf.GGUFReader(str(path)).fields["general.architecture"]
    return bytes(field.parts[field.data[0]]).decode()


@pytest.mark.parametrize("case", CASES)
def test_f16_decodes_as_moekit(case, built, exported, llama_cpp):
    _folder, model = built(case)
    path = exported(case, "f16")
    assert arch_of(path) == CASES[case][3]
    tokens, lc = run_llama(llama_cpp, path, PROMPT)
    assert tokens == greedy(model, PROMPT), "llama.cpp's greedy tokens differ from moekit's"
    err = rel(lc, logits(model, PROMPT + tokens))
    print(f"{case} f16: {CASES[case][3]}, max |logit diff| / max |logit| = {err:.2e}")
    assert err < TOLERANCE["f16"]


def rounded(model, path):
    """A copy of ``model`` whose matrices went through the file's own tensor types (quantise, dequantise)."""
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}
    m = copy.deepcopy(model)

    def through(w, name):
        a = w.detach().numpy()
        q = types[name]
        w.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(a, q), q).reshape(a.shape).copy()))

    with torch.no_grad():
        through(m.embed.weight, "token_embd.weight")
        if m.lm_head is not None:
            through(m.lm_head.weight, "output.weight")
        for i, b in enumerate(m.layers):
            p = f"blk.{i}."
            through(b.attn.wqkv, p + "attn_q.weight")  # row blocks: the Q/K row order does not matter
            through(b.attn.wo, p + "attn_output.weight")
            if hasattr(b.ffn, "experts"):
                through(b.ffn.experts.w13, p + "ffn_gate_exps.weight")
                through(b.ffn.experts.w2, p + "ffn_down_exps.weight")
                if b.ffn.shared is not None:
                    through(b.ffn.shared.w13, p + "ffn_gate_shexp.weight")
                    through(b.ffn.shared.w2, p + "ffn_down_shexp.weight")
            else:
                through(b.ffn.w13, p + "ffn_gate.weight")
                through(b.ffn.w2, p + "ffn_down.weight")
    return m


@pytest.mark.parametrize("qtype", ["bf16", "q8_0", "q4_0"])
@pytest.mark.parametrize("case", CASES)
def test_rounded_types_run_as_moekit_on_the_same_weights(case, qtype, built, exported, llama_cpp):
    _folder, model = built(case)
    path = exported(case, qtype)
    tokens, lc = run_llama(llama_cpp, path, PROMPT)
    assert len(tokens) == STEPS
    same = rounded(model, path)
    ml = logits(same, PROMPT + tokens)
    err = np.abs(lc - ml).max(-1) / np.abs(ml).max()  # per position
    ties = np.flatnonzero(routing_margin(same, PROMPT + tokens) < FLIP)
    first = ties[0] if len(ties) else len(err)
    print(f"{case} {qtype}: max |logit diff| / max |logit| = {err[:first].max() if first else float('nan'):.2e} "
          f"over the {first} positions before the first near-tied routing, median {np.median(err):.2e}, "
          f"max {err.max():.2e} over all {len(err)} (moekit on the same rounded weights)")
    assert (err[:first] < TOLERANCE[qtype]).all(), f"positions before any near-tied routing differ: {err[:first]}"
    assert np.median(err) < TOLERANCE[qtype]


@torch.no_grad()
def routing_margin(model, ids):
    """Per position: the smallest gap between the k-th and (k+1)-th router logit over the MoE layers."""
    if model.config.moe is None:
        return np.full(len(ids), np.inf)
    k = model.config.moe.top_k
    with model.record_routing() as routing:
        model(torch.tensor([ids]))
    gaps = [(s[:, k - 1] - s[:, k]).numpy() for s in (r.logits_TE.sort(-1, descending=True).values
                                                       for r in routing)]
    return np.min(np.stack(gaps), 0)


def test_tensor_types_follow_llama_cpp():
    Q = gguf.GGMLQuantizationType
    assert tensor_type("blk.0.attn_norm.weight", (64,), "q4_0", False) == Q.F32
    assert tensor_type("blk.0.ffn_gate_inp.weight", (8, 64), "q8_0", False) == Q.F32  # routers stay F32
    assert tensor_type("blk.0.attn_q.bias", (64,), "f16", False) == Q.F32
    assert tensor_type("blk.0.ffn_down_exps.weight", (8, 64, 32), "q4_0", False) == Q.Q4_0
    assert tensor_type("output.weight", (512, 64), "q4_0", False) == Q.Q8_0  # llama-quantize: Q6_K, else Q8_0
    assert tensor_type("token_embd.weight", (512, 64), "q4_0", True) == Q.Q8_0  # tied: it is the output
    assert tensor_type("token_embd.weight", (512, 64), "q4_0", False) == Q.Q4_0
    assert tensor_type("blk.0.ffn_down_exps.weight", (8, 64, 24), "q8_0", False) == Q.F16  # rows of 24: no blocks
    assert tensor_type("blk.0.attn_k.weight", (32, 64), "bf16", False) == Q.BF16


def test_tokenizer_metadata_matches_moekit(built, exported, llama_cpp):
    """llama.cpp tokenises as moekit does: SentencePiece (llama + scores), byte-level BPE with the GPT-2
    and Qwen2 pre-tokenizers (gpt2 + merges), XVERSE's Metaspace BPE (llama, merge-rank scores)."""
    texts = ["The quick brown fox jumps over the lazy dog.", "Hello, what is your name? It is 2024 now.",
             "北京的景点：故宫、天坛", "In the beginning\nGod created"]
    want = {"mixtral": ("llama", "default"), "deepseek": ("gpt2", "gpt-2"), "qwen2_moe": ("gpt2", "qwen2"),
            "xverse": ("llama", "default")}
    for case, (model_kind, pre) in want.items():
        folder, _ = built(case)
        tok = moekit.Tokenizer.from_pretrained(folder)
        llm = llama_cpp.Llama(model_path=str(exported(case, "f16")), n_ctx=64, n_threads=2, verbose=False)
        try:
            meta = llm.metadata
            assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == (model_kind, pre), case
            assert llm.n_vocab() == 512  # ids past the tokenizer's are [PADn] pieces
            for text in texts:
                assert llm.tokenize(text.encode(), add_bos=False) == tok.encode(text, add_special_tokens=False), \
                    (case, text)
                assert llm.detokenize(tok.encode(text, add_special_tokens=False)).decode().strip() == text.strip()
            assert llm.tokenize(b"Hello") == tok.encode("Hello"), case  # add_bos as moekit adds it
            assert (llm.token_bos(), llm.token_eos()) == (tok.bos_token_id, tok.eos_token_id), case
            if case == "mixtral":
                assert meta["tokenizer.chat_template"] == CHAT
        finally:
            llm.close()


def test_cli_writes_the_file_export_gguf_writes(built, tmp_path, llama_cpp, capsys):
    folder, _ = built("xverse")
    out = tmp_path / "cli" / "x.gguf"
    assert cli_main(["export", "--format", "gguf", "--type", "q8_0", "--model", str(folder), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().err
    plain = moekit.load(folder, dtype="float32", kernels="reference")
    again = export_gguf(plain, tmp_path / "api.gguf", "q8_0", tokenizer=folder, name=folder.name, progress=False)
    assert out.read_bytes() == again.read_bytes()
    assert [p.name for p in out.parent.iterdir()] == ["x.gguf"]  # no temporary file left
    tokens, _ = run_llama(llama_cpp, out, PROMPT, steps=4)  # the same bytes as the files checked above
    assert len(tokens) == 4


def test_a_quantised_model_is_dequantised(built, tmp_path, llama_cpp):
    from moekit.models.quantize import QuantConfig, quantize_model

    _, model = built("mixtral")
    q = copy.deepcopy(model)
    quantize_model(q, QuantConfig.of("int8", 32))
    path = export_gguf(q, tmp_path / "q.gguf", "f16", progress=False)  # no tokenizer: token ids only
    tokens, lc = run_llama(llama_cpp, path, PROMPT, steps=4)
    assert rel(lc, logits(q, PROMPT + tokens)) < TOLERANCE["f16"]


# -- refusals: one line naming the family and the reason, nothing written ---------------------------------

REFUSED = {  # family, variant, words the message must contain
    "llama_moe": ("llama_moe", {}, "Linear-Tanh-Linear"),
    "orion-layernorm": ("orion", {}, "LayerNorm"),
    "qwen2_moe-norm-topk": ("qwen2_moe", {"norm_topk_prob": True}, "norm_topk_prob"),
    "qwen2_moe-dense-first": ("qwen2_moe", {"mlp_only_layers": [0]}, "leading dense layers"),
    "xverse-dynamic-rope": ("xverse", {"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "dynamic-NTK"),
    "llama_moe-per-layer-scale": ("llama_moe", {"gate_network": "linear", "score_scale_factor": [2.0, 4.0]},
                                  "per layer"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_refused_with_the_reason_before_writing(case, tmp_path, capsys):
    family, variant, words = REFUSED[case]
    folder = tmp_path / "ckpt"
    make_checkpoint(family, folder, seed=1, **variant)
    out = tmp_path / "out.gguf"
    with pytest.raises(GGUFExportError, match=words) as e:
        export_checkpoint(folder, out)
    assert f"a {family} model cannot be exported to GGUF" in str(e.value) and "\n" not in str(e.value)
    assert cli_main(["export", "--model", str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moekit export: error:") and words in err and "\n" not in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_router_balancing_biases_are_refused(built, tmp_path):
    _, model = built("mixtral")
    m = copy.deepcopy(model)
    router = m.layers[0].ffn.router
    del router.bias  # a plain None attribute when the config has no bias balancing
    router.register_buffer("bias", torch.ones(4))
    with pytest.raises(GGUFExportError, match="balancing biases"):
        export_gguf(m, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_targets_of_the_layouts(built):
    got = {case: target(built(case)[1].config).arch for case in ("mixtral", "deepseek", "qwen2_moe", "xverse")}
    assert got == {"mixtral": "llama", "deepseek": "deepseek", "qwen2_moe": "qwen2moe", "xverse": "bailingmoe"}
    t = target(built("xverse")[1].config)
    assert t.shared == 2 and t.permute  # XVERSE's two shared experts: one MLP 2 x the expert width


def test_bad_type_and_out_path(built, tmp_path):
    _folder, model = built("mixtral")
    with pytest.raises(GGUFExportError, match="q5_k"):
        export_gguf(model, tmp_path / "x.gguf", "q5_k")
    with pytest.raises(GGUFExportError, match="is a folder"):
        export_gguf(model, tmp_path, "f16")


def test_a_failed_write_leaves_the_old_file(built, tmp_path, monkeypatch, caplog):
    folder, model = built("mixtral")
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")
    calls = []

    def boom(data, qtype):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(data, qtype)

    real = gguf.quants.quantize
    monkeypatch.setattr(gguf.quants, "quantize", boom)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(model, out, "q8_0", tokenizer=folder, progress=False)
    assert out.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_unknown_pre_tokenizer_is_written_as_default_with_a_note(tmp_path, caplog):
    from moekit.weights.gguf_vocab import read_vocab

    write_hf_bpe(tmp_path, vocab_size=300, byte_level=True)
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\d+|\D+"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with caplog.at_level(logging.WARNING):
        vocab = read_vocab(tmp_path, 300)
    assert (vocab.model, vocab.pre) == ("gpt2", "default") and "not recognised" in caplog.text
    with pytest.raises(moekit.errors.MoekitError, match="more than the model's vocab_size=200"):
        read_vocab(tmp_path, 200)


def test_pre_tokenizers_llama_cpp_names():
    from moekit.weights.gguf_vocab import _DEEPSEEK_LLM, _LLAMA3, _pre

    def spec(*regexes, digits=False):
        splits = [{"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": False} for r in regexes]
        tail = [{"type": "Digits", "individual_digits": True}] * digits + [{"type": "ByteLevel", "use_regex": False}]
        return {"pre_tokenizer": {"type": "Sequence", "pretokenizers": splits + tail}}

    assert _pre({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}, None) == "gpt-2"
    assert _pre(spec(_LLAMA3), None) == "llama-bpe"
    assert _pre(spec(*_DEEPSEEK_LLM), None) == "deepseek-llm"
    assert _pre(spec(*_DEEPSEEK_LLM[:5], digits=True), None) == "deepseek-llm"  # as DeepSeek's file spells it
