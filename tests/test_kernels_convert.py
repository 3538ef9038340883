"""The CPU backend's weight conversion while loading (moekit/kernels/cpu/convert.cpp, cpu_convert.py), bit
for bit against the reference:

- GGUF dequantisation against gguf-py's numpy code (``reference.dequantize``), on random blocks (every bit
  pattern of scales, signs and quants; the float16 super-block scales kept finite) and on llama.cpp files,
  loaded and offloaded;
- int8 / int4 quantisation against ``kernels.weights.quantize_into``, on matrices of every source dtype,
  rounding, format and group, and through ``moekit.load(quantize=...)`` of a folder and a GGUF file,
  in memory and offloaded."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import moekit
from moekit.kernels import cpu, cpu_convert, reference
from moekit.kernels.weights import QuantWeight, quantize_into, weight_views

gguf = pytest.importorskip("gguf", reason="gguf-py is a moekit dependency (pip install -e .)")
pytestmark = pytest.mark.skipif(not cpu.supported(), reason="the C++ kernels need an x86-64 CPU with AVX-512")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from weight_convert import HALVES, random_blocks  # noqa: E402


@pytest.fixture(scope="module")
def kern():
    return cpu.CpuKernels(torch.float32, gemm="moekit")


def test_every_kind_has_a_kernel(kern):
    assert cpu_convert.kinds(kern.ext) == set(HALVES)


@pytest.mark.parametrize("kind", sorted(HALVES))
@pytest.mark.parametrize("rows, K", [(1, 256), (7, 512), (300, 1024)])
def test_kernel_equals_gguf_py(kern, kind, rows, K):
    """The same float32 bits as gguf-py, signed zeros included (a block whose scales are 0)."""
    raw = random_blocks(kind, rows, K, seed=rows)
    if rows > 1:
        for at in HALVES[kind]:
            raw.view(rows, K // 256, -1)[0, 0, at:at + 2] = 0
    want = reference.dequantize(raw, kind, K)
    got = kern.dequantize(raw, kind, K)
    assert got.dtype == torch.float32 and got.shape == (rows, K)
    assert torch.isfinite(want).all() and want.abs().max() > 0 and (rows == 1 or (want[0, :256] == 0).all())
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    out = torch.full((rows, K), float("nan"))  # into a caller's buffer (the loader's pieces), both backends
    assert kern.dequantize(raw, kind, K, out).data_ptr() == out.data_ptr() and torch.equal(out, want)
    out.fill_(float("nan"))
    assert reference.dequantize(raw, kind, K, out).data_ptr() == out.data_ptr() and torch.equal(out, want)


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
    backend's load; offloaded, the model equals the in-memory one; with quantize="int4" (dequantised, then
    quantised by the kernels), the int4 weights equal the reference backend's."""
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
    qref = moekit.load(file, quantize="int4", kernels="reference")
    calls, kernel = [], cpu.CpuKernels.dequantize
    monkeypatch.setattr(cpu.CpuKernels, "dequantize", lambda self, *a: calls.append(a[1]) or kernel(self, *a))
    got = moekit.load(file, dtype=torch.float32, kernels="cpu")
    assert set(calls) & set(HALVES), calls
    want = dict(ref.named_parameters())
    for name, p in got.named_parameters():
        assert torch.equal(p, want[name]), name
    budget = tight_budget(file, dtype=torch.float32, kernels="cpu")
    off = moekit.load(file, dtype=torch.float32, kernels="cpu", max_memory=budget)
    calls.clear()
    assert_same_as_in_memory(got, off, input_ids)
    assert set(calls) & set(HALVES), calls  # on cache misses too
    qgot = moekit.load(file, quantize="int4", kernels="cpu")  # dequantised and quantised by the kernels
    assert_same_quantised(qgot, qref)


def assert_same_quantised(got, want) -> None:
    """Every int8 / int4 weight holds the same values and scales (the CPU backend keeps per-channel int8 in
    its decode kernel's panels), every other tensor is equal."""
    mods = dict(want.named_modules())
    n = 0
    for name, m in got.named_modules():
        if isinstance(m, QuantWeight):
            w = mods[name]
            assert torch.equal(m.dequantize(torch.float32), w.dequantize(torch.float32)), name
            assert torch.equal(m.scale_rows(), w.scale_rows()), name
            n += 1
    assert n
    params = dict(want.named_parameters())
    for name, p in got.named_parameters():
        assert torch.equal(p, params[name]), name


def empty_quant(shape, fmt: str, group: int):
    *lead, N, K = shape
    data = torch.full((*lead, N, K // 2 if fmt == "int4" else K), 7, dtype=torch.uint8 if fmt == "int4" else torch.int8)
    return data, torch.zeros(*lead, N, K // group, dtype=torch.float16)


@pytest.mark.parametrize("src", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("fmt, group, shape", [("int4", 32, (3, 40, 96)), ("int4", 64, (300, 256)),
                                               ("int4", 128, (17, 512)), ("int8", 100, (9, 100)),
                                               ("int8", 1024, (70, 1024))])
def test_quantize_equals_the_reference(kern, src, dtype, fmt, group, shape):
    """Values of every magnitude (rows scaled over 12 orders), an all-zero row and an exact tie of the
    rounding; float16 sources go through float32 pieces."""
    g = torch.Generator().manual_seed(group)
    w = torch.randn(shape, generator=g) * torch.logspace(-8, 4, shape[-2])[:, None]
    w[..., 0, :] = 0
    w[..., 1, :2] = torch.tensor([1.0, 2.5])  # absmax 2.5 -> scale 2.5 / qmax; 2.5 / scale = qmax exactly
    w = w.to(src)
    want, got = empty_quant(shape, fmt, group), empty_quant(shape, fmt, group)
    quantize_into(w, *want, dtype)
    kern.quantize_into(w, *got, dtype)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_quantize_fills_views_of_a_quant_weight(kern):
    """Into a QuantWeight's rows, as the loader does: row pieces of its data and scales."""
    w = torch.randn(64, 256)
    a, b = QuantWeight("int4", (64, 256), 32, device="cpu"), QuantWeight("int4", (64, 256), 32, device="cpu")
    quantize_into(w, a.data, a.scale, torch.bfloat16)
    kern.quantize_into(w[:40], b.data[:40], b.scale[:40], torch.bfloat16)
    kern.quantize_into(w[40:], b.data[40:], b.scale[40:], torch.bfloat16)
    assert torch.equal(a.data, b.data) and torch.equal(a.scale, b.scale)
    assert torch.equal(b.dequantize(torch.float32), a.dequantize(torch.float32))


@pytest.mark.parametrize("quantize", ["int4", "int8"])
def test_cpu_backend_quantises_a_folder_as_the_reference(tmp_path, monkeypatch, quantize):
    """``moekit.load(folder, quantize=...)`` with the CPU backend, whose kernel quantises every matrix: the same
    data and scales as the reference backend's load; offloaded, every expert read into the cache on a miss
    too (experts of whole 4 KiB pages)."""
    from tests.familyref.checkpoints import make_checkpoint

    folder = tmp_path / "m"
    make_checkpoint("mixtral", folder, seed=3, dtype="bfloat16", intermediate_size=64, num_local_experts=8,
                    num_hidden_layers=3)
    calls, kernel = [], cpu.CpuKernels.quantize_into
    monkeypatch.setattr(cpu.CpuKernels, "quantize_into", lambda self, *a, **k: calls.append(1) or kernel(self, *a, **k))
    ref = moekit.load(folder, quantize=quantize, kernels="reference")
    got = moekit.load(folder, quantize=quantize, kernels="cpu")
    assert calls
    assert_same_quantised(got, ref)
    calls.clear()
    off = moekit.load(folder, quantize=quantize, kernels="cpu", max_memory=64)
    with torch.no_grad():
        off(torch.arange(1, 40)[None] % off.config.vocab_size)
    assert calls and off.offload.lru
    for layer, e in off.offload.lru:
        a, b = off.layers[layer].ffn.experts, ref.layers[layer].ffn.experts
        for w in ("w13", "w2"):  # the same bytes (the in-memory model's in panels, the offloaded ones in rows)
            got, want = weight_views(getattr(a, w), "w", e), weight_views(getattr(b, w), "w", e)
            assert all(torch.equal(got[k], want[k]) for k in ("w", "w_scale")), (layer, e, w)
