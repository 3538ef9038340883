"""The CPU backend's GGUF dequantisation (moekit/kernels/cpu/dequant.cpp) against gguf-py's numpy code
(``reference.dequantize``, the spec): bit for bit, on random blocks (every bit pattern of scales, signs and
quants; the float16 super-block scales kept finite) and on a llama.cpp file, loaded and offloaded."""

import numpy as np
import pytest
import torch

import moekit
from moekit.kernels import cpu, reference

gguf = pytest.importorskip("gguf", reason="gguf-py is a moekit dependency (pip install -e .)")
pytestmark = pytest.mark.skipif(not cpu.supported(), reason="the C++ kernels need an x86-64 CPU with AVX-512")

# GGML type -> byte offsets of its float16 super-block scales (ggml-common.h)
HALVES = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "IQ3_XXS": (0,)}


@pytest.fixture(scope="module")
def kern():
    return cpu.CpuKernels(torch.float32, gemm="moekit")


def random_blocks(kind: str, rows: int, K: int, seed: int = 0) -> torch.Tensor:
    """Rows of K values in random ``kind`` blocks: random bytes, the float16 scales drawn from N(0, 0.01)."""
    qtype = gguf.GGMLQuantizationType[kind]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, K // block, size), dtype=np.uint8)
    for at in HALVES[kind]:
        raw[..., at:at + 2] = (rng.standard_normal((rows, K // block, 1)) * 0.01).astype(np.float16).view(np.uint8)
    return torch.from_numpy(raw.reshape(rows, -1))


def test_every_kind_has_a_kernel(kern):
    assert kern.dequant_kinds == set(HALVES)


@pytest.mark.parametrize("kind", sorted(HALVES))
@pytest.mark.parametrize("rows, K", [(1, 256), (7, 512), (300, 1024)])
def test_kernel_equals_gguf_py(kern, kind, rows, K):
    raw = random_blocks(kind, rows, K, seed=rows)
    want = reference.dequantize(raw, kind, K)
    got = kern.dequantize(raw, kind, K)
    assert got.dtype == torch.float32 and got.shape == (rows, K)
    assert torch.isfinite(want).all() and want.abs().max() > 0
    assert torch.equal(got, want)


def test_other_types_go_to_gguf_py(kern):
    raw = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 4 * 18), dtype=np.uint8))
    raw.view(3, 4, 18)[..., :2] = torch.tensor([0x2000], dtype=torch.int16).view(torch.uint8)  # finite scales
    assert torch.equal(kern.dequantize(raw, "Q4_0", 128), reference.dequantize(raw, "Q4_0", 128))


def test_bad_rows_are_refused(kern):
    raw = random_blocks("Q4_K", 2, 256)
    with pytest.raises(RuntimeError, match="Q4_K rows of 512 values take 288 bytes, not 144"):
        kern.dequantize(raw, "Q4_K", 512)


@pytest.mark.parametrize("ftype", ["Q4_K_M", "IQ3_XXS"])
def test_cpu_backend_loads_llama_cpp_files_as_the_reference(tmp_path, input_ids, monkeypatch, ftype):
    """A file from llama.cpp's quantizer (Q4_K_M: Q4_K, Q6_K and more; IQ3_XXS experts: tests/ggufconv.py),
    loaded with the CPU backend, whose kernels dequantise its blocks: every weight equals the reference
    backend's load; offloaded, the model equals the in-memory one."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (.ci/run installs it)")
    from moekit.weights.gguf_export import export_checkpoint
    from tests.familyref.checkpoints import make_checkpoint
    from tests.ggufconv import rewrite
    from tests.offloadfix import assert_same_as_in_memory, tight_budget

    folder, f16, file = tmp_path / "m", tmp_path / "m-f16.gguf", tmp_path / f"m-{ftype}.gguf"
    make_checkpoint("mixtral", folder, seed=6, hidden_size=256, intermediate_size=256, num_local_experts=4,
                    num_hidden_layers=2)
    export_checkpoint(folder, f16, "f16", progress=False)
    if ftype == "IQ3_XXS":
        rewrite(f16, file, experts_as=ftype)
    else:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
        assert llama_cpp.llama_model_quantize(str(f16).encode(), str(file).encode(), params) == 0
    kinds = {t.tensor_type.name for t in gguf.GGUFReader(file).tensors}
    assert kinds & set(HALVES), kinds
    ref = moekit.load(file, dtype=torch.float32, kernels="reference")
    calls, kernel = [], cpu.CpuKernels.dequantize
    monkeypatch.setattr(cpu.CpuKernels, "dequantize", lambda self, *a: calls.append(a[1]) or kernel(self, *a))
    got = moekit.load(file, dtype=torch.float32, kernels="cpu")
    assert set(calls) & set(HALVES), calls
    want = dict(ref.named_parameters())
    for name, p in got.named_parameters():
        assert torch.equal(p, want[name]), name
    off = moekit.load(file, dtype=torch.float32, kernels="cpu", max_memory=tight_budget(file, dtype=torch.float32, kernels="cpu"))
    calls.clear()
    assert_same_as_in_memory(got, off, input_ids)
    assert set(calls) & set(HALVES), calls  # on cache misses too
