"""GGUF import: models from files llama.cpp's own converter wrote (tests/ggufconv.py) generate as the
checkpoints they came from, equal llama.cpp's logits, and round-trip through moekit export."""

import subprocess
import sys

import numpy as np
import pytest
import torch

import moekit
from tests.ggufconv import (
    TEMPLATE,
    TEXTS,
    assert_kept,
    checkpoint,
    convert,
    greedy,
    rewrite,
    rounded_reference,
    same_generation,
    tiny,
)

gguf = pytest.importorskip("gguf", reason="gguf-py is a moekit dependency (pip install -e .)")


@pytest.mark.parametrize("outtype, rel", [("f32", 1e-6), ("f16", 2e-3), ("bf16", 2e-2), ("q8_0", None)])
def test_mixtral_converted_by_llama_cpp_generates_the_same(converter, mixtral, outtype, rel):
    """Mixtral layout -> `llama` GGUF (Q/K rows permuted by the converter, experts stacked): the same 20 greedy
    tokens and logits (1e-5) as the checkpoint with its matrices rounded to the stored type by gguf-py; for
    the float types also the same tokens as the checkpoint itself, with logits within ``rel`` (relative L2)."""
    file = convert(converter, mixtral, outtype)
    if outtype != "f32":
        same_generation(mixtral, file, 1e-5, ref=rounded_reference(mixtral, file, outtype.upper()))
    if rel is not None:
        same_generation(mixtral, file, rel)


def test_mixtral_q8_0_keeps_its_int8_blocks(converter, mixtral):
    """--outtype q8_0 loads as an int8 model holding the file's bytes; its logits stay near the unrounded
    checkpoint's (the greedy tokens of a random tiny model need not)."""
    file = convert(converter, mixtral, "q8_0")
    assert_kept(moekit.load(file), file, "int8")
    _, want = greedy(moekit.load(mixtral, dtype=torch.float32), list(range(1, 30)), 0)
    _, got = greedy(moekit.load(file, dtype=torch.float32), list(range(1, 30)), 0)
    assert ((got - want).norm() / want.norm()).item() < 3e-2


def test_mixtral_q4_0_quantised_by_llama_cpp_keeps_its_int4_blocks(converter, mixtral, tmp_path):
    """llama.cpp's own quantizer (llama_model_quantize, pure Q4_0) on the f32 GGUF: moekit loads an int4 model
    holding the file's bytes, with the same tokens and logits as the checkpoint rounded to Q4_0 by gguf-py."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (.ci/run installs it)")
    file = tmp_path / "mixtral-q4_0.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.pure = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, True
    assert llama_cpp.llama_model_quantize(str(convert(converter, mixtral, "f32")).encode(), str(file).encode(),
                                          params) == 0
    assert_kept(moekit.load(file), file, "int4")
    same_generation(mixtral, file, 1e-5, ref=rounded_reference(mixtral, file, "Q4_0"))


def llama_cpp_logits(file, ids: list[int]) -> np.ndarray:
    """llama.cpp's own logits for every position of ``ids`` (llama-cpp-python, float32 KV cache, 1 thread)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (.ci/run installs it)")
    llm = llama_cpp.Llama(str(file), logits_all=True, n_ctx=64, n_threads=1, type_k=0, type_v=0, flash_attn=False,
                          verbose=False)
    try:
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)])
    finally:
        llm.close()


def apus_file(converter, tmp_path_factory, ftype: str):
    """A Mixtral-layout (APUS) checkpoint, converted to F16 by llama.cpp's converter ("f16"), then quantised to
    ``ftype`` by llama.cpp's quantizer (IQ3_XXS: its experts by ggml_quantize_chunk, with a uniform importance
    matrix); built once per session."""
    root = tmp_path_factory.getbasetemp() / "apus"
    folder = root / "apus"
    if not folder.exists():  # K-quant rows are 256 values: every matrix dimension a multiple of 256
        checkpoint(folder, tiny("mixtral", architectures=["MixtralForCausalLM"], vocab_size=512, hidden_size=256,
                                intermediate_size=256, num_local_experts=4, num_experts_per_tok=2), "sp", seed=4)
    f16, file = convert(converter, folder, "f16"), root / f"apus-{ftype}.gguf"
    if ftype == "f16" or file.exists():
        return f16 if ftype == "f16" else file
    if ftype == "IQ3_XXS":
        return rewrite(f16, file, experts_as=ftype)
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (.ci/run installs it)")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    assert llama_cpp.llama_model_quantize(str(f16).encode(), str(file).encode(), params) == 0
    return file


@pytest.mark.parametrize("ftype", ["Q2_K", "IQ3_XXS", "Q3_K_M", "Q4_K_M"])
def test_apus_release_types_from_llama_cpps_quantizer(converter, tmp_path_factory, ftype):
    """The four types APUS-xDAN-4.0-MoE is published in, written by llama.cpp's own quantizer from its
    converter's F16 file of a Mixtral-layout checkpoint (APUS's). IQ3_XXS needs an importance matrix, which
    llama-cpp-python cannot give the quantizer: its experts come from ggml's quantize function with a uniform
    one, the rest stays F16. moekit dequantises every block through gguf-py and computes what llama.cpp
    computes on the same file. llama.cpp multiplies these blocks with activations rounded to 8 bits (Q8_K), so
    the logits differ by 1.6-3.2% here (2.2% for a Q8_0 file, whose blocks moekit reads exactly), a small part
    of what the quantisation itself changed (28-88%):
    both read the same weights."""
    file, f16 = apus_file(converter, tmp_path_factory, ftype), apus_file(converter, tmp_path_factory, "f16")
    kinds = {t.tensor_type.name for t in gguf.GGUFReader(file).tensors if "_exps" in t.name}
    assert ftype.split("_M")[0] in kinds, kinds
    model = moekit.load(file, dtype=torch.float32)
    assert model.quant is None
    ids = moekit.Tokenizer.from_pretrained(file).encode("The quick brown fox jumps over the lazy dog")[:24]
    with torch.no_grad():
        want = model(torch.tensor([ids]))[0].numpy()
        unquantised = moekit.load(f16, dtype=torch.float32)(torch.tensor([ids]))[0].numpy()
    got = llama_cpp_logits(file, ids)

    def rel(a, b):
        return np.linalg.norm(a - b) / np.linalg.norm(b)

    assert rel(got, want) < 5e-2 and rel(got, want) < rel(want, unquantised) / 5
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.8


@pytest.mark.parametrize("source, quantize, group", [("f16", "int4", None), ("f16", "int8", None),
                                                      ("Q4_K_M", "int4", 32), ("Q4_K_M", "int8", 64)])
def test_quantize_as_read_equals_quantize_after(converter, tmp_path_factory, source, quantize, group):
    """``moekit.load(file, quantize=...)`` quantises each matrix as it is read, a piece of rows at a time (peak
    memory: the quantised model); the result equals loading in float32, then quantising the whole model."""
    from moekit.kernels.weights import QuantWeight
    from moekit.models.quantize import QuantConfig, quantize_model

    file = apus_file(converter, tmp_path_factory, source)
    got = moekit.load(file, dtype=torch.float32, quantize=quantize, group=group, kernels="reference")
    want = moekit.load(file, dtype=torch.float32, kernels="reference")
    quantize_model(want, QuantConfig.of(quantize, group))
    assert got.quant == want.quant
    mods = dict(want.named_modules())
    checked = 0
    for name, m in got.named_modules():
        if isinstance(m, QuantWeight):
            assert isinstance(mods[name], QuantWeight) and torch.equal(m.values(), mods[name].values()), name
            assert torch.equal(m.scale_rows(), mods[name].scale_rows()), name
            checked += 1
    assert checked >= 9  # attention, experts and the LM head of both layers
    ids = torch.tensor([list(range(1, 20))])
    with torch.no_grad():
        assert torch.equal(got(ids), want(ids))


@pytest.mark.parametrize("arch", ["llama", "qwen2moe"])  # a SentencePiece and a byte-level BPE vocabulary
def test_quantize_command_converts_a_gguf_file_once(converted, tmp_path, arch):
    """`moekit quantize --model x.gguf --out DIR`: the model quantised as it is read, the file's vocabulary and
    chat template written as a checkpoint folder holds them; the folder loads as the same model and tokenizer,
    with no GGUF to dequantise on every load."""
    from moekit.cli import main

    file, out = converted(arch)[1], tmp_path / arch
    assert main(["quantize", "--model", str(file), "--out", str(out), "--bits", "4", "--group", "32"]) == 0
    want = moekit.load(file, dtype=torch.float32, quantize="int4", group=32, kernels="reference")
    got = moekit.load(out, dtype=torch.float32, kernels="reference")
    assert got.quant == want.quant and got.config.family == want.config.family
    ids = torch.tensor([list(range(1, 20))])
    with torch.no_grad():
        assert torch.equal(got(ids), want(ids))
    a, b = moekit.Tokenizer.from_pretrained(file), moekit.Tokenizer.from_pretrained(out)
    assert b.kind == a.kind
    for text in TEXTS:
        assert b.encode(text) == a.encode(text), text
        assert b.decode(b.encode(text)) == a.decode(a.encode(text))
    assert (b.chat_template, b.bos_token_id, b.eos_token_id, b.pad_token_id, b.special_ids) == (
        a.chat_template, a.bos_token_id, a.eos_token_id, a.pad_token_id, a.special_ids)


def test_deepseek_converted_by_llama_cpp_generates_the_same(converted):
    """DeepSeek-MoE v1 -> `deepseek`: a leading dense layer, 2 shared experts as one MLP, top-3 of 8 not
    renormalised."""
    same_generation(*converted("deepseek"), 1e-6)


def test_bailingmoe_loads_as_xverse_moe(converted):
    """`bailingmoe` -> XVERSE-MoE: the two shared experts one ungated MLP of width 2 x 32, top-3 renormalised
    (expert_weights_norm; XVERSE's +1e-6), the same weights as the checkpoint it was made from."""
    folder, file = converted("bailingmoe")
    got = moekit.load(file, dtype=torch.float32)
    m = got.config.moe
    assert (got.config.family, m.shared_width, m.shared_gate, m.renormalize, m.renormalize_eps) == (
        "xverse", 64, False, True, 1e-6)
    src = moekit.load(folder, dtype=torch.float32)
    want = moekit.MoEDecoder(got.config)
    want.load_state_dict(src.state_dict())  # one canonical layout: the DeepSeek weights in an XVERSE model
    prompt = list(range(1, 30))
    with torch.no_grad():
        assert torch.allclose(got(torch.tensor([prompt])), want(torch.tensor([prompt])), rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "deepseek", "qwen2moe", "bailingmoe"])
def test_logits_equal_llama_cpps_on_the_same_file(arch, converted):
    """moekit and llama.cpp itself (llama-cpp-python, float32 KV cache) on the same f32 GGUF: the same logits
    for every position of a 24-token prompt -- the import reads each architecture's math as llama.cpp does."""
    file = converted(arch)[1]
    ids = list(range(1, 25))
    with torch.no_grad():
        want = moekit.load(file, dtype=torch.float32)(torch.tensor([ids]))[0].numpy()
    got = llama_cpp_logits(file, ids)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5


def test_qwen2_moe_converted_by_llama_cpp_generates_the_same(converted):
    """Qwen2-MoE -> `qwen2moe` (no Q/K permutation: NEOX rotary; q/k/v biases; a sigmoid-gated shared expert
    stored as [D]) with a byte-level BPE (`gpt2` vocabulary, merges, pre-tokenizer gpt-2)."""
    folder, file = converted("qwen2moe")
    same_generation(folder, file, 1e-6)
    a, b = moekit.Tokenizer.from_pretrained(folder), moekit.Tokenizer.from_pretrained(file)
    assert b.kind == "tokenizers"
    for text in [*TEXTS, "  two  spaces\n\nand\ttabs ", "it's 2024's"]:
        assert b.encode(text) == a.encode(text), text
        assert b.decode(b.encode(text)) == a.decode(a.encode(text))
    assert b.chat_template == a.chat_template == TEMPLATE
    assert (b.bos_token_id, b.eos_token_id, b.pad_token_id, b.special_ids) == (
        a.bos_token_id, a.eos_token_id, a.pad_token_id, a.special_ids)


def test_causal_lm_from_a_gguf_file_chats(converter, mixtral):
    """moekit.CausalLM.from_pretrained("x.gguf"): model, tokenizer and chat template from the one file."""
    lm = moekit.CausalLM.from_pretrained(convert(converter, mixtral, "f32"), dtype="float32")
    ref = moekit.CausalLM.from_pretrained(mixtral, dtype="float32")
    messages = [{"role": "user", "content": "Hello"}]
    assert lm.chat_format.encode(lm.tokenizer, messages) == ref.chat_format.encode(ref.tokenizer, messages)
    assert lm.chat(None, messages, max_new_tokens=8, temperature=0) == ref.chat(None, messages, max_new_tokens=8,
                                                                                temperature=0)


def test_cli_generates_from_a_gguf_file(converted):
    """`moekit generate --model x.gguf --chat`: the same reply as from the checkpoint folder."""
    folder, file = converted("llama")

    def run(model):
        r = subprocess.run([sys.executable, "-m", "moekit.cli", "generate", "--model", str(model), "--chat", "--prompt",
                            "Hello", "--max-new-tokens", "6", "--temperature", "0", "--dtype", "float32"],
                           check=False, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return r.stdout

    assert run(file) == run(folder)


# ----------------------------------------------------------------------------- tensor formats
def test_one_tensor_per_expert_files_load_the_same(converter, mixtral, tmp_path):
    """The per-expert tensor names of early Mixtral GGUF files (still read by llama.cpp) load as the stacked ones."""
    src = convert(converter, mixtral, "q8_0")
    file = rewrite(src, tmp_path / "split.gguf", split=True)
    assert "blk.0.ffn_down.3.weight" in {t.name for t in gguf.GGUFReader(file).tensors}
    ids = torch.tensor([list(range(1, 20))])
    with torch.no_grad():
        assert torch.equal(moekit.load(file)(ids), moekit.load(src)(ids))


# ----------------------------------------------------------------------------- moekit's own exporter
ROUND_TRIP = {"mixtral": "mixtral", "orion-rmsnorm": "mixtral", "deepseek": "deepseek", "qwen2_moe": "qwen2_moe",
              "xverse": "xverse", "xverse-linear-rope": "xverse", "llama_moe-linear-gate": "xverse",
              "llama-tied": "llama"}  # tests/test_gguf_export.py's case -> the family the file imports as


@pytest.mark.parametrize("qtype", ["f16", "q8_0", "q4_0"])
@pytest.mark.parametrize("case", list(ROUND_TRIP))
def test_export_then_import_computes_the_same(case, qtype, tmp_path):
    """moekit export --format gguf, then moekit.load: the logits of the checkpoint with each matrix rounded to
    the type the file stores it in (relative L2 <= 1e-5), in the family the architecture maps to (Orion-MoE
    with RMSNorm comes back as Mixtral, LLaMA-MoE with a linear gate as XVERSE-MoE with its routed scale
    and a zero shared expert); Q8_0 / Q4_0 matrices kept as int8 / int4."""
    from moekit.families import NameMap
    from moekit.weights.gguf_export import export_checkpoint
    from moekit.weights.gguf_import import GGUF_NAMES, PER_EXPERT
    from tests.familyref.checkpoints import make_checkpoint
    from tests.test_gguf_export import CASES, _write_tokenizer

    family, variant, tok, _ = CASES[case]
    folder = tmp_path / case
    make_checkpoint(family, folder, seed=3, vocab_size=512, dtype="float32", **variant)
    _write_tokenizer(tok, folder)
    file = export_checkpoint(folder, tmp_path / f"{case}-{qtype}.gguf", qtype, progress=False)
    got = moekit.load(file, dtype=torch.float32)
    assert got.config.family == ROUND_TRIP[case]
    assert (got.quant.format if got.quant else None) == {"f16": None, "q8_0": "int8", "q4_0": "int4"}[qtype]
    kinds = {t.name: t.tensor_type for t in gguf.GGUFReader(file).tensors}
    # the weights as the exporter read them (the checkpoint's own dtype), then each rounded to its GGUF type
    ref, table = moekit.load(folder, kernels="reference").float(), NameMap(GGUF_NAMES)
    with torch.no_grad():
        for name, view in ref.named_views().items():
            g = table.to_hf(name)
            if g is None:  # training only: LLaMA-MoE's router noise projection
                continue
            if (m := PER_EXPERT.fullmatch(g)) and g not in kinds:
                g = f"blk.{m[1]}.ffn_{m[2]}_exps.weight"
            if name == "lm_head.weight" and g not in kinds:  # tied
                g = "token_embd.weight"
            k = kinds[g]
            view.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(view.numpy(), k), k)))
    ids = torch.tensor([[5, 17, 99, 200, 31, 7, 64, 300, 12, 250, 3, 1, 400, 77]])
    with torch.no_grad():
        want, out = ref(ids)[0], got(ids)[0]
    assert ((out - want).norm() / want.norm()).item() <= 1e-5
    a, b = moekit.Tokenizer.from_pretrained(folder), moekit.Tokenizer.from_pretrained(file)
    assert b.chat_template == a.chat_template
    for text in ("Hello, what is your name?", "北京的景点：故宫、天坛"):
        assert b.decode(b.encode(text)) == a.decode(a.encode(text))
