"""GGUF import (moekit/weights/gguf_import.py, gguf_tokenizer.py) against files llama.cpp's own converter wrote.

The converter is ``convert_hf_to_gguf.py`` of the llama.cpp that the llama-cpp-python 0.3.36 sdist
vendors (the installed wheel does not ship it): the copy bench/serve_setup.py keeps in
~/.cache/moekit (or $MOEKIT_CACHE), else downloaded there by ``pip download`` as that script does;
without either the converter tests skip. It runs with its own gguf-py. Checkpoints are tiny random
models written by ``moekit.save`` with real trained tokenizers (tests/tokfixtures.py).
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import moekit
from moekit.families import get_family
from tests.tokfixtures import write_hf_bpe, write_sentencepiece

gguf = pytest.importorskip("gguf", reason="gguf-py is a moekit dependency (pip install -e .)")

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("MOEKIT_CACHE", Path.home() / ".cache" / "moekit"))
TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
TEXTS = ["Hello, what is your name?", "The quick brown fox jumps over the lazy dog.", "北京的景点：故宫、天坛",
         "naïve café ☃ 🦙 3.14", "<s>user: hi</s>"]


@pytest.fixture(scope="module")
def converter() -> Path:
    """llama.cpp's convert_hf_to_gguf.py (bench/serve_setup.py's cached sdist copy, downloaded if absent)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from serve_setup import llama_source

    try:
        src = llama_source(CACHE)
    except (subprocess.CalledProcessError, OSError, StopIteration) as e:
        pytest.skip(f"llama.cpp's converter is not available: no copy in {CACHE} and `pip download "
                    f"llama-cpp-python==0.3.36` failed ({e})")
    return src / "convert_hf_to_gguf.py"


def convert(script: Path, folder: Path, outtype: str, pin_pre: str | None = None) -> Path:
    """``folder`` converted by llama.cpp at ``outtype``. pin_pre: the BPE pre-tokenizer name for a tokenizer
    the converter's hash table cannot know (ours are trained on the spot), by patching its lookup."""
    out = folder.parent / f"{folder.name}-{outtype}.gguf"
    if out.exists():
        return out
    code = ("import runpy, sys\n"
            f"sys.path.insert(0, {str(script.parent)!r})\n")
    if pin_pre:
        code += ("from conversion.base import TextModel\n"
                 f"TextModel.get_vocab_base_pre = lambda self, tokenizer: {pin_pre!r}\n")
    code += f"runpy.run_path({str(script)!r}, run_name='__main__')\n"
    args = [sys.executable, "-c", code, str(folder), "--outtype", outtype, "--outfile", str(out)]
    run = subprocess.run(args, check=False, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def checkpoint(folder: Path, hf: dict, tokenizer: str, seed: int = 0) -> Path:
    """A random model of config.json ``hf`` saved by moekit, plus a trained tokenizer ("sp" or "bpe")."""
    cfg = get_family(hf["model_type"]).to_config(hf)
    torch.manual_seed(seed)
    model = moekit.MoEDecoder(cfg)
    model.init_weights(std=0.08)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:  # norms and biases away from their init values, so a mix-up shows
                p.add_(torch.randn_like(p) * 0.1)
    moekit.save(model, folder)
    if tokenizer == "sp":
        write_sentencepiece(folder, hf["vocab_size"], chat_template=TEMPLATE)
    else:
        write_hf_bpe(folder, hf["vocab_size"], byte_level=True, chat_template=TEMPLATE)
    return folder


def tiny(model_type: str, **kw) -> dict:
    base = {"vocab_size": 400, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
            "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32", "tie_word_embeddings": False}
    return {**base, "model_type": model_type, **kw}


MIXTRAL = tiny("mixtral", architectures=["MixtralForCausalLM"], intermediate_size=64, num_local_experts=4,
               num_experts_per_tok=2)
DEEPSEEK = tiny("deepseek", architectures=["DeepseekForCausalLM"], num_hidden_layers=3, intermediate_size=96,
                moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3,
                first_k_dense_replace=1, rms_norm_eps=1e-6, rope_theta=10000.0)
QWEN2_MOE = tiny("qwen2_moe", architectures=["Qwen2MoeForCausalLM"], intermediate_size=96, num_experts=6,
                 num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                 norm_topk_prob=False, rms_norm_eps=1e-6, pad_token_id=0)


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory) -> Path:
    return checkpoint(tmp_path_factory.mktemp("gguf") / "mixtral", MIXTRAL, "sp")


@pytest.fixture(scope="module")
def converted(tmp_path_factory, converter, mixtral):
    """arch -> (checkpoint, its f32 GGUF by llama.cpp's converter), built on first use. `bailingmoe` (XVERSE-MoE's
    target, which no converter writes): a DeepSeek-MoE checkpoint without dense layers converted to `deepseek`,
    renamed to `bailingmoe` with expert_weights_norm -- the same tensors, renormalised routing."""
    built = {"llama": (mixtral, None)}

    def get(arch: str) -> tuple[Path, Path]:
        if arch not in built or built[arch][1] is None:
            root = tmp_path_factory.mktemp(arch)
            if arch == "llama":
                built[arch] = (mixtral, convert(converter, mixtral, "f32"))
            elif arch == "deepseek":
                folder = checkpoint(root / "deepseek", DEEPSEEK, "sp", seed=1)
                built[arch] = (folder, convert(converter, folder, "f32"))
            elif arch == "qwen2moe":  # a byte-level BPE: the converter is told its pre-tokenizer is GPT-2's
                folder = checkpoint(root / "qwen2moe", QWEN2_MOE, "bpe", seed=2)
                built[arch] = (folder, convert(converter, folder, "f32", pin_pre="gpt-2"))
            else:
                folder = checkpoint(root / "deepseek0", {**DEEPSEEK, "num_hidden_layers": 2, "first_k_dense_replace": 0},
                                    "sp", seed=3)
                built[arch] = (folder, rewrite(convert(converter, folder, "f32"), root / "bailingmoe.gguf",
                                               arch="bailingmoe", meta={"bailingmoe.expert_weights_norm": True}))
        return built[arch]

    return get


def greedy(model, prompt: list[int], n: int = 20) -> tuple[list[int], torch.Tensor]:
    """n greedy tokens by full recompute, and the logits of prompt + those tokens."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        return ids[len(prompt):], model(torch.tensor([ids]))[0].float()


def same_generation(folder: Path, file: Path, rel: float, ref=None) -> float:
    """The GGUF's 20 greedy tokens equal ``ref``'s (default: the checkpoint's) and its logits are within
    ``rel`` (relative L2) of them; returns that error."""
    ref, got = ref or moekit.load(folder, dtype=torch.float32), moekit.load(file, dtype=torch.float32)
    assert got.config == ref.config
    prompt = moekit.Tokenizer.from_pretrained(folder).encode("The quick brown fox")
    want_ids, want = greedy(ref, prompt)
    got_ids, logits = greedy(got, prompt)
    assert got_ids == want_ids
    err = ((logits - want).norm() / want.norm()).item()
    assert err <= rel, err
    return err


def assert_kept(model, file: Path, fmt: str) -> None:
    """The model holds the file's Q8_0 / Q4_0 blocks as moekit int8 / int4 weights, byte for byte: data and
    float16 scales of the experts (stacked) and of the LM head."""
    from moekit.kernels.weights import QuantWeight

    assert model.quant is not None and (model.quant.format, model.quant.group) == (fmt, 32)
    t = {t.name: t for t in gguf.GGUFReader(file).tensors}
    block = 34 if fmt == "int8" else 18
    pairs = ((model.layers[1].ffn.experts.w2, "blk.1.ffn_down_exps.weight"), (model.lm_head.weight, "output.weight"))
    for w, name in pairs:
        assert isinstance(w, QuantWeight) and w.format == fmt
        raw = torch.from_numpy(np.array(t[name].data)).reshape(*w.shape[:-1], -1, block)
        assert torch.equal(w.scale.view(torch.uint8).reshape(*w.shape[:-1], -1, 2), raw[..., :2])
        assert torch.equal(w.data.view(torch.uint8).reshape(*w.shape[:-1], -1, block - 2), raw[..., 2:])


def rounded_reference(folder: Path, file: Path, kind: str):
    """The checkpoint with every matrix the file stores as ``kind`` (all but the routers, whose rows are not
    blocks of 32, and the norms) rounded to it by gguf-py: what the file should hold, exactly."""
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(file).tensors}
    assert {n for n, k in kinds.items() if k == kind} == {
        n for n in kinds if not n.endswith(("norm.weight", "ffn_gate_inp.weight"))}
    model = moekit.load(folder, dtype=torch.float32)
    qtype = gguf.GGMLQuantizationType[kind]
    with torch.no_grad():
        for name, view in model.named_views().items():
            if view.ndim == 2 and "router" not in name:
                view.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(view.numpy(), qtype), qtype)))
    return model


# ----------------------------------------------------------------------------- llama.cpp's own converter
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
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (.ci/run installs it)")
    file = converted(arch)[1]
    ids = list(range(1, 25))
    with torch.no_grad():
        want = moekit.load(file, dtype=torch.float32)(torch.tensor([ids]))[0].numpy()
    llm = llama_cpp.Llama(str(file), logits_all=True, n_ctx=64, n_threads=1, type_k=0, type_v=0, flash_attn=False,
                          verbose=False)
    try:
        llm.eval(ids)
        got = np.array(llm.scores[:len(ids)])
    finally:
        llm.close()
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
@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0"])
def test_q8_0_and_q4_0_read_as_moekit_int8_int4_bit_for_bit(kind):
    """A Q8_0 / Q4_0 block array is moekit's int8 / int4 QuantWeight with group 32 over the same bytes:
    its dequantisation equals gguf-py's exactly."""
    from moekit.weights.gguf_import import tensor_value

    w = np.random.default_rng(0).standard_normal((3, 5, 96)).astype(np.float32)
    raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType[kind])
    q = tensor_value(raw, kind, w.shape)
    assert q.format == ("int8" if kind == "Q8_0" else "int4") and q.group == 32
    want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind])
    assert torch.equal(q.dequantize(torch.float32), torch.from_numpy(want))


# ----------------------------------------------------------------------------- bad files
def rewrite(src: Path, dst: Path, arch: str | None = None, drop: tuple[str, ...] = (), meta: dict | None = None,
            split: bool = False) -> Path:
    """A copy of a GGUF file with another architecture name (its keys renamed), without some tensors, with
    metadata changed or added (None removes a key), or (split) with one tensor per expert as the first
    Mixtral GGUF files had them (blk.N.ffn_gate.E.weight instead of blk.N.ffn_gate_exps.weight)."""
    r = gguf.GGUFReader(src)
    old = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(dst, arch or old)
    for f in r.fields.values():
        if f.name == "general.architecture" or f.name.startswith("GGUF."):
            continue
        value = (meta or {}).get(f.name, f.contents())
        if value is not None:
            sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(f.name.replace(f"{old}.", f"{arch}.", 1) if arch else f.name, value, f.types[0], sub)
    kinds = {bool: gguf.GGUFValueType.BOOL, int: gguf.GGUFValueType.UINT32, float: gguf.GGUFValueType.FLOAT32}
    for key, value in (meta or {}).items():
        if key not in r.fields and value is not None:
            w.add_key_value(key, value, kinds[type(value)])
    for t in r.tensors:
        if split and "_exps." in t.name:
            for e, part in enumerate(t.data):
                w.add_tensor(t.name.replace("_exps.", f".{e}."), np.array(part), raw_dtype=t.tensor_type)
        elif t.name not in drop:
            w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def one_line_error(path: Path, *parts: str) -> None:
    with pytest.raises(moekit.CheckpointError) as e:
        moekit.load(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and all(p in msg for p in parts), msg


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
