"""Shared by the GGUF import tests: llama.cpp's own converter, tiny checkpoints it converts, and
rewritten copies of its files.

The converter is ``convert_hf_to_gguf.py`` of the llama.cpp that the llama-cpp-python 0.3.36 sdist
vendors (the installed wheel does not ship it): the copy bench/serve_setup.py keeps in
~/.cache/moekit (or $MOEKIT_CACHE), else downloaded there by ``pip download`` as that script does;
without either the converter tests skip. It runs with its own gguf-py. Checkpoints are tiny random
models written by ``moekit.save`` with real trained tokenizers (tests/tokfixtures.py).
"""

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import moekit
from moekit.families import get_family
from tests.tokfixtures import write_hf_bpe, write_sentencepiece

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
    from moekit.kernels.weights import QuantWeight, weight_views

    assert model.quant is not None and (model.quant.format, model.quant.group) == (fmt, 32)
    t = {t.name: t for t in gguf.GGUFReader(file).tensors}
    block = 34 if fmt == "int8" else 18
    pairs = ((model.layers[1].ffn.experts.w2, "blk.1.ffn_down_exps.weight"), (model.lm_head.weight, "output.weight"))
    for w, name in pairs:
        assert isinstance(w, QuantWeight) and w.format == fmt
        raw = torch.from_numpy(np.array(t[name].data)).reshape(*w.shape[:-1], -1, block)
        rows = weight_views(w, "w")  # the bytes in rows (the CPU backend keeps int4 in panels)
        assert torch.equal(rows["w_scale"].view(torch.uint8).reshape(*w.shape[:-1], -1, 2), raw[..., :2])
        assert torch.equal(rows["w"].view(torch.uint8).reshape(*w.shape[:-1], -1, block - 2), raw[..., 2:])


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


def rewrite(src: Path, dst: Path, arch: str | None = None, drop: tuple[str, ...] = (), meta: dict | None = None,
            split: bool = False, experts_as: str | None = None) -> Path:
    """A copy of a GGUF file with another architecture name (its keys renamed), without some tensors, with
    metadata changed or added (None removes a key), (split) with one tensor per expert as the first
    Mixtral GGUF files had them (blk.N.ffn_gate.E.weight instead of blk.N.ffn_gate_exps.weight), or with
    its stacked expert matrices quantised to type ``experts_as`` by llama.cpp (ggml_quantize)."""
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
        elif experts_as and "_exps." in t.name:
            w.add_tensor(t.name, ggml_quantize(t, experts_as), raw_dtype=gguf.GGMLQuantizationType[experts_as])
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


def ggml_quantize(t, kind: str) -> np.ndarray:
    """GGUF tensor ``t`` quantised to ``kind`` by llama.cpp with a uniform importance matrix: ggml_quantize_chunk
    of the libggml that llama-cpp-python ships, the function llama-quantize calls. For the IQ types that need
    an importance matrix, which llama-cpp-python's llama_model_quantize cannot be given (it refuses IQ3_XXS)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (.ci/run installs it)")
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    qtype = gguf.GGMLQuantizationType[kind]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    x = np.ascontiguousarray(gguf.dequantize(t.data, t.tensor_type), dtype=np.float32)
    n = x.shape[-1]
    out, ones = np.empty((*x.shape[:-1], n // block * size), np.uint8), np.ones(n, np.float32)
    assert lib.ggml_quantize_chunk(qtype, x.ctypes.data, out.ctypes.data, 0, x.size // n, n, ones.ctypes.data) \
        == out.nbytes
    return out
