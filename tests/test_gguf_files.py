"""GGUF import: tokenizers and chat templates from the file, Q8_0 / Q4_0 blocks read bit for bit, and bad
files refused with one line naming the file and tensor or key (tests/ggufconv.py makes the files)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import moekit
from tests.ggufconv import MIXTRAL, TEMPLATE, TEXTS, convert, one_line_error, rewrite

gguf = pytest.importorskip("gguf", reason="gguf-py is a moekit dependency (pip install -e .)")


def test_tokenizer_from_gguf_encodes_as_the_original(converter, mixtral):
    """The `llama` (SentencePiece) vocabulary rebuilt from tokens, scores and types: ids, decoded text,
    special ids and the chat template as the checkpoint's own tokenizer has them."""
    a = moekit.Tokenizer.from_pretrained(mixtral)
    b = moekit.Tokenizer.from_pretrained(convert(converter, mixtral, "f32"))
    assert b.kind == "sentencepiece"
    for text in TEXTS:
        assert b.encode(text) == a.encode(text), text
        assert b.decode(b.encode(text)) == a.decode(a.encode(text)) != ""
    assert (b.bos_token_id, b.eos_token_id, b.add_bos, b.special_ids) == (a.bos_token_id, a.eos_token_id,
                                                                          a.add_bos, a.special_ids)
    assert b.chat_template == a.chat_template == TEMPLATE


def test_real_sentencepiece_vocabulary_round_trips(converter, tmp_path):
    """A real LLaMA-2-family tokenizer.model (Mistral-7B v1's, 32000 pieces, as mistral-common ships it),
    converted with --vocab-only: the same ids and text as the original, whitespace runs included."""
    mistral_common = pytest.importorskip("mistral_common", reason="ships the real tokenizer.model (test extra)")
    import json
    import shutil

    folder = tmp_path / "mistral"
    folder.mkdir()
    shutil.copy(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", folder / "tokenizer.model")
    (folder / "config.json").write_text(json.dumps({**MIXTRAL, "vocab_size": 32000}))
    specials = {"0": "<unk>", "1": "<s>", "2": "</s>"}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "added_tokens_decoder": {i: {"content": t, "special": True} for i, t in specials.items()}}))
    out = tmp_path / "mistral-vocab.gguf"
    run = subprocess.run([sys.executable, str(converter), str(folder), "--vocab-only", "--outfile", str(out)],
                         check=False, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = moekit.Tokenizer.from_pretrained(folder), moekit.Tokenizer.from_pretrained(out)
    for text in [*TEXTS, "  two  spaces\nnew line\ttab ", " leading space", "<s>[INST] hi [/INST]</s> x"]:
        assert b.encode(text) == a.encode(text), text
        assert b.decode(b.encode(text)) == a.decode(a.encode(text))


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_tokenizer_from_gguf_encodes_as_llama_cpp(which, converted):
    """The same ids as llama.cpp's own tokenizer on the same file, for both vocabulary kinds. Where the file
    cannot carry the original's normaliser (remove_extra_whitespaces, on in the trained SentencePiece test
    tokenizer, collapses the whitespace runs below), moekit reads the file as llama.cpp does."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (.ci/run installs it)")
    file = converted("llama" if which == "llama" else "qwen2moe")[1]
    tok = moekit.Tokenizer.from_pretrained(file)
    llm = llama_cpp.Llama(str(file), vocab_only=True, verbose=False)
    for text in [*TEXTS, "  two  spaces\nnew line\ttab ", "</s> after a special", "it's 2024's"]:
        want = llm.tokenize(text.encode(), add_bos=False, special=True)
        assert tok.encode(text, add_special_tokens=False) == want, text
    assert tok.add_bos == (llm.tokenize(b"x", add_bos=True)[0] == llm.token_bos())


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0"])
def test_q8_0_and_q4_0_read_as_moekit_int8_int4_bit_for_bit(kind):
    """A Q8_0 / Q4_0 block array is moekit's int8 / int4 QuantWeight with group 32 over the same bytes:
    its dequantisation equals gguf-py's exactly."""
    from moekit.weights.gguf_tensors import tensor_value

    w = np.random.default_rng(0).standard_normal((3, 5, 96)).astype(np.float32)
    raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType[kind])
    q = tensor_value(raw, kind, w.shape)
    assert q.format == ("int8" if kind == "Q8_0" else "int4") and q.group == 32
    want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind])
    assert torch.equal(q.dequantize(torch.float32), torch.from_numpy(want))


# ----------------------------------------------------------------------------- bad files
def test_unsupported_architecture_is_refused(converter, mixtral, tmp_path):
    file = rewrite(convert(converter, mixtral, "f32"), tmp_path / "falcon.gguf", arch="falcon")
    one_line_error(file, "architecture 'falcon' is not supported")


def test_truncated_file_names_the_first_tensor_cut_off(converter, mixtral, tmp_path):
    data = convert(converter, mixtral, "f32").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:len(data) * 2 // 3])
    one_line_error(tmp_path / "cut.gguf", "truncated", "tensor 'blk.")
    (tmp_path / "header.gguf").write_bytes(data[:300])  # inside the metadata
    one_line_error(tmp_path / "header.gguf", "not a readable GGUF file")
    (tmp_path / "text.gguf").write_text("not a gguf file\n")
    one_line_error(tmp_path / "text.gguf", "not a readable GGUF file")


def test_missing_tensor_is_named(converter, mixtral, tmp_path):
    file = rewrite(convert(converter, mixtral, "q8_0"), tmp_path / "missing.gguf", drop=("blk.1.ffn_up_exps.weight",))
    one_line_error(file, "tensor 'blk.1.ffn_up_exps.weight' is missing")


def test_wrong_shape_and_missing_key_are_named(converter, mixtral, tmp_path):
    src = convert(converter, mixtral, "f32")
    file = rewrite(src, tmp_path / "shape.gguf", meta={"llama.feed_forward_length": 32})
    one_line_error(file, "tensor 'blk.0.ffn_gate_exps.weight' has shape [4, 64, 64]", "implies [4, 32, 64]")
    file = rewrite(src, tmp_path / "key.gguf", meta={"llama.block_count": None})
    one_line_error(file, "metadata key 'llama.block_count' is missing")


def test_pre_tokenizer_table_is_llama_cpps(converter):
    """Every `tokenizer.ggml.pre` moekit reads has llama.cpp's own regex list (src/llama-vocab.cpp of the
    vendored llama.cpp, parsed here), and each builds a working tokenizers pipeline."""
    import ast

    from moekit.weights.gguf_tokenizer import NORMAL, PRE_TOKENIZERS, bpe_tokenizer

    source = (converter.parent / "src" / "llama-vocab.cpp").read_text(encoding="utf-8")
    body = source[source.index("struct llm_tokenizer_bpe : llm_tokenizer {"):]
    enum = {"gpt-2": "GPT2", "llama-bpe": "LLAMA3", "qwen2": "QWEN2", "deepseek-llm": "DEEPSEEK_LLM",
            "deepseek-coder": "DEEPSEEK_CODER", "deepseek-v3": "DEEPSEEK3_LLM", "bailingmoe": "BAILINGMOE"}
    alphabet = [chr(c) for c in range(33, 127)]  # enough of the byte-level alphabet for ASCII text
    for name, (regexes, _, _) in PRE_TOKENIZERS.items():
        label = "default:" if name == "default" else f"case LLAMA_VOCAB_PRE_TYPE_{enum[name]}:"
        block = body[body.index("regex_exprs = {", body.index(label)):]
        block = block[:block.index("};")]
        want = [ast.literal_eval(line.strip().rstrip(",")) for line in block.splitlines()[1:]
                if line.strip().startswith('"')]
        assert regexes == want, name
        tok = bpe_tokenizer(alphabet + ["Ġ"], [NORMAL] * 95, [], name)
        assert tok.decode(tok.encode("it's 12 apples").ids) == "it's 12 apples", name
