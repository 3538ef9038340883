"""Expert offload from a GGUF file (``moekit.load("x.gguf", max_memory=GiB)``): every expert read from its
byte range in the file. Under a budget that forces evictions, logits, greedy tokens and engine logprobs equal
``moekit.load("x.gguf")``'s bit for bit: F16 / BF16 / F32 read or converted, Q8_0 / Q4_0 kept as int8 / int4,
K-quants and IQ3_XXS from llama.cpp's own quantizer dequantised, in files from moekit's exporter and llama.cpp's
converter; with quantize=, every matrix quantised as it is read (from a checkpoint folder too). A damaged
file is named as without offload."""

import subprocess
import sys

import pytest

import moekit
from moekit.weights import CheckpointError
from moekit.weights.gguf_export import export_checkpoint
from tests.familyref.checkpoints import make_checkpoint
from tests.ggufconv import convert, rewrite
from tests.offloadfix import assert_same_as_in_memory, tight_budget

gguf = pytest.importorskip("gguf", reason="gguf-py is a moekit dependency (pip install -e .)")

# Tiny checkpoints whose per-expert stacks are whole 4 KiB pages (tests/test_offload.py's)
CASES = {"mixtral": ("mixtral", {"dtype": "bfloat16", "intermediate_size": 64, "num_local_experts": 8,
                                 "num_hidden_layers": 3}),
         "xverse": ("xverse", {"num_hidden_layers": 3})}  # -> bailingmoe: top-3 of 8, two shared experts


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    built = {}

    def get(case: str, qtype: str):
        if case not in built:
            family, variant = CASES[case]
            built[case] = tmp_path_factory.mktemp(case) / "m"
            make_checkpoint(family, built[case], seed=3, **variant)
        folder = built[case]
        out = folder.parent / f"{case}-{qtype}.gguf"
        if not out.exists():
            export_checkpoint(folder, out, qtype, progress=False)
        return out

    return get


@pytest.mark.parametrize("case, qtype", [("mixtral", "f16"), ("mixtral", "bf16"), ("mixtral", "q8_0"),
                                         ("mixtral", "q4_0"), ("xverse", "q8_0"), ("xverse", "f16")])
def test_offloaded_gguf_equals_in_memory(case, qtype, exported, input_ids):
    file = exported(case, qtype)
    ref = moekit.load(file)
    off = moekit.load(file, max_memory=tight_budget(file))
    assert off.offload.experts, "the experts of this file should be paged"
    if qtype in ("q8_0", "q4_0"):
        assert off.quant is not None and off.quant.group == 32  # kept in the file's blocks, read as int8 / int4
    assert_same_as_in_memory(ref, off, input_ids)
    buffered = off.offload_stats()["buffer_bytes"]
    assert (buffered == 0) == (qtype == "bf16")  # read in place only when the file's dtype is the model's


def test_llama_cpp_converted_file_offloads_and_generates(converter, mixtral, input_ids):
    """The f32 file of llama.cpp's converter (Q/K rows permuted, experts stacked): offloaded, the same tokens
    and logits; the command line generates the in-memory text with it and reports the cache."""
    file = convert(converter, mixtral, "f32")
    ref = moekit.load(file)
    off = moekit.load(file, max_memory=tight_budget(file))
    assert_same_as_in_memory(ref, off, input_ids % ref.config.vocab_size)

    def run(*extra):
        r = subprocess.run([sys.executable, "-m", "moekit.cli", "generate", "--model", str(file), "--prompt",
                            "The quick brown fox", "--max-new-tokens", "8", "--temperature", "0", *extra],
                           check=False, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return r

    offloaded = run("--max-memory", f"{tight_budget(file):.6f}")
    assert offloaded.stdout == run().stdout and "hit the cache" in offloaded.stderr


@pytest.mark.parametrize("ftype, kind", [("Q4_K_M", "Q4_K"), ("IQ3_XXS", "IQ3_XXS")])
def test_k_quants_from_llama_cpp_offload(tmp_path, input_ids, ftype, kind):
    """llama.cpp's quantizer at Q4_K_M (Q4_K and Q6_K rows, plus its fallbacks) on a moekit F16 export, or its
    IQ3_XXS experts (ggml_quantize_chunk, see tests/ggufconv.py): the experts are dequantised by gguf-py on
    every read, and the model equals the in-memory one."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (.ci/run installs it)")
    folder = tmp_path / "m"
    make_checkpoint("mixtral", folder, seed=5, hidden_size=256, intermediate_size=256, num_local_experts=4,
                    num_hidden_layers=2)
    f16, file = tmp_path / "m-f16.gguf", tmp_path / f"m-{ftype}.gguf"
    export_checkpoint(folder, f16, "f16", progress=False)
    if ftype == "IQ3_XXS":
        rewrite(f16, file, experts_as=ftype)
    else:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
        assert llama_cpp.llama_model_quantize(str(f16).encode(), str(file).encode(), params) == 0
    kinds = {t.tensor_type.name for t in gguf.GGUFReader(file).tensors if "exps" in t.name}
    assert kind in kinds, kinds
    ref = moekit.load(file)
    off = moekit.load(file, max_memory=tight_budget(file))
    assert ref.quant is None  # K-quants are dequantised
    assert_same_as_in_memory(ref, off, input_ids)


def test_damaged_gguf_is_named_when_offloaded(exported, tmp_path):
    file = exported("mixtral", "q8_0")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(file.read_bytes()[: file.stat().st_size - 1000])
    with pytest.raises(CheckpointError, match=r"cut\.gguf: .*tensor '[^']+' ends at byte .* truncated"):
        moekit.load(cut, max_memory=1)
    with pytest.raises(CheckpointError, match=r"nothing\.gguf: no such GGUF file"):
        moekit.load(tmp_path / "nothing.gguf", max_memory=1)
    with pytest.raises(CheckpointError, match=r"already quantised \(int8 from GGUF Q8_0\), and loads as such"):
        moekit.load(file, max_memory=1, quantize="int4")


@pytest.mark.parametrize("quantize", ["int4", "int8"])
@pytest.mark.parametrize("source", ["gguf", "folder"])
def test_quantized_as_read_offloads(source, quantize, exported, input_ids):
    """quantize= with offload, from an F16 file or the bfloat16 checkpoint folder it was exported from: every
    matrix quantised as it is read, the experts on every cache miss; the offloaded model equals the in-memory
    one (both quantised on the way in)."""
    path = exported("mixtral", "f16")
    path = path if source == "gguf" else path.parent / "m"
    ref = moekit.load(path, quantize=quantize, kernels="reference")
    assert ref.quant.format == quantize
    off = moekit.load(path, max_memory=tight_budget(path, quantize=quantize, kernels="reference"), quantize=quantize,
                      kernels="reference")
    assert off.quant == ref.quant and off.offload.experts
    assert_same_as_in_memory(ref, off, input_ids)
