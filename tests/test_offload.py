"""Expert offload (``moekit.load(path, max_memory=GiB)``): routed experts stay in the safetensors files and
are read into an LRU cache on demand. With a budget that forces evictions, logits and greedy tokens
equal the in-memory model's bit for bit (same kernels); the cache is LRU over (layer, expert); bad
budgets and checkpoints are refused with the numbers; resident memory stays within the budget."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import moekit
from moekit.errors import MoekitError
from moekit.kernels import cpu
from moekit.weights import CheckpointError
from moekit.weights.expert_cache import PAGE
from tests.familyref.checkpoints import make_checkpoint
from tests.offloadfix import assert_same_as_in_memory, tight_budget

GIB = 2**30
# Tiny checkpoints whose per-expert stacks are whole 4 KiB pages (smaller ones stay resident).
CASES = {
    "mixtral-bf16": ("mixtral", {"dtype": "bfloat16", "intermediate_size": 64, "num_local_experts": 8,
                                 "num_hidden_layers": 3}, None),
    "xverse": ("xverse", {"num_hidden_layers": 3}, None),  # bf16, top-3 of 8, two shared experts
    "deepseek": ("deepseek", {"num_hidden_layers": 4}, None),  # float32, a dense first layer, top-3, shared
    "mixtral-int8": ("mixtral", {"intermediate_size": 64, "num_local_experts": 8, "num_hidden_layers": 3}, "int8"),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    built = {}

    def get(case):
        if case not in built:
            family, variant, quant = CASES[case]
            folder = tmp_path_factory.mktemp(case)
            make_checkpoint(family, folder, seed=3, **variant)
            if quant:
                moekit.save(moekit.load(folder, quantize=quant), folder / "q")
                folder = folder / "q"
            built[case] = folder
        return built[case]

    return get


@pytest.mark.parametrize("case", list(CASES))
def test_offloaded_equals_in_memory(case, folders, input_ids):
    folder = folders(case)
    ref = moekit.load(folder)
    off = moekit.load(folder, max_memory=tight_budget(folder))
    assert off.offload.experts, "the experts of this checkpoint should be paged"
    assert_same_as_in_memory(ref, off, input_ids)


def test_quantised_scales_that_are_not_whole_pages_stay_resident(folders):
    off = moekit.load(folders("mixtral-int8"), max_memory=64)
    ex = off.layers[0].ffn.experts
    assert ex.w13.scale.numel() * 2 // 8 % PAGE and ex.w13.data.numel() // 8 % PAGE == 0
    reads = {s.name.rsplit(".", 1)[-1] for x in off.offload.experts.values() for s, _ in x.reads}
    assert reads == {"weight"}  # data only: the scales were read at load time


def test_layers_without_whole_page_experts_stay_resident(checkpoints, input_ids):
    """A checkpoint whose int8 experts are not whole 4 KiB pages each: nothing to page, every layer resident
    and computing as in memory (the cache used to be asked for experts it never held)."""
    folder, _, _ = checkpoints("mixtral")
    ref = moekit.load(folder, quantize="int8")
    off = moekit.load(folder, quantize="int8", max_memory=64)
    assert not off.offload.experts and off.offload_stats()["misses"] == 0
    with torch.no_grad():
        assert torch.equal(off(input_ids), ref(input_ids))


@pytest.mark.skipif(not cpu.supported(), reason="the C++ kernels need AVX-512")
def test_cpu_kernels_offloaded_equal_in_memory(folders, input_ids):
    folder = folders("mixtral-bf16")
    ref = moekit.load(folder, kernels="cpu")
    off = moekit.load(folder, kernels="cpu", max_memory=tight_budget(folder, kernels="cpu"))
    params = moekit.SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True, logprobs=1)
    a = moekit.Engine(ref, adapt_threads=False).generate(input_ids.tolist(), params)
    b = moekit.Engine(off, adapt_threads=False).generate(input_ids.tolist(), params)
    assert [c.token_ids for c in a] == [c.token_ids for c in b] and [c.logprobs for c in a] == [c.logprobs for c in b]
    assert off.offload_stats()["evictions"] > 0


def test_lru_over_layer_expert_pairs(folders):
    folder = folders("mixtral-bf16")  # 8 experts, top-2, 3 layers: the cache holds at least one layer's 8
    off = moekit.load(folder, max_memory=tight_budget(folder, spare_experts=0))
    cache = off.offload
    per = cache.stats.expert_bytes // len(cache.experts)
    assert cache.capacity == 8 * per

    def ids(*e):
        return torch.tensor([e])

    cache.ensure(0, ids(*range(8)))
    assert list(cache.lru) == [(0, e) for e in range(8)] and cache.stats.misses == 8
    cache.ensure(1, ids(5, 0))  # evicts the two least recently used: (0, 0), (0, 1)
    assert set(cache.lru) == {(0, e) for e in range(2, 8)} | {(1, 0), (1, 5)}
    cache.ensure(0, ids(2))  # a hit makes (0, 2) the most recent
    assert (cache.stats.hits, cache.stats.misses, list(cache.lru)[-1]) == (1, 10, (0, 2))
    cache.ensure(2, ids(7, 7))  # one expert, named twice: evicts (0, 3)
    assert (0, 3) not in cache.lru and (0, 2) in cache.lru and (2, 7) in cache.lru
    assert cache.stats.evictions == 3 and cache.stats.bytes_read == 11 * per
    assert cache.pool.free_bytes == 0


def test_budget_too_small_names_the_numbers(folders):
    folder = folders("mixtral-bf16")
    need = tight_budget(folder, spare_experts=0)
    moekit.load(folder, max_memory=need)  # the smallest budget accepted
    with pytest.raises(MoekitError, match=r"max_memory=0\.0001 GiB is too small .* take [\d.]+ MiB and the expert "
                                          r"cache needs at least [\d.]+ MiB \(top-2 experts x 3 MoE layers, and one "
                                          r"layer's 8, at 0\.0 MiB per expert\): at least [\d.]+ GiB"):
        moekit.load(folder, max_memory=0.0001)
    with pytest.raises(MoekitError, match="too small"):
        moekit.load(folder, max_memory=need - PAGE / GIB)
    with pytest.raises(MoekitError, match="a number > 0"):
        moekit.load(folder, max_memory=0)


def test_refusals(folders, tmp_path):
    make_checkpoint("mixtral", tmp_path / "bin", fmt="bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model.*\.bin.*pickle.*can only be loaded whole"):
        moekit.load(tmp_path / "bin", max_memory=1)
    folder = folders("mixtral-bf16")
    with pytest.raises(CheckpointError, match="already quantised"):
        moekit.load(folders("mixtral-int8"), max_memory=1, quantize="int8")
    with pytest.raises(MoekitError, match="computes on the CPU"):
        moekit.load(folder, max_memory=1, device="cuda")
    off = moekit.load(folder, max_memory=1)
    with pytest.raises(MoekitError, match="holds only its cached experts"):
        moekit.save(off, tmp_path / "copy")
    with pytest.raises(MoekitError, match="stays where it was loaded"):
        off.to(torch.float32)
    assert moekit.load(folder).offload_stats() is None


def test_nan_in_an_expert_is_named_on_first_use(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "m"
    make_checkpoint("mixtral", folder, dtype="bfloat16", intermediate_size=64, num_local_experts=8, shards=1)
    shard = folder / "model.safetensors"
    t = load_file(shard)
    name = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    t[name][0, 0] = float("nan")
    save_file(t, shard, metadata={"format": "pt"})
    off = moekit.load(folder, max_memory=1)
    with pytest.raises(CheckpointError, match=f"model.safetensors: tensor '{name}' has 1 NaN"):
        off.offload.ensure(1, torch.tensor([[3]]))


RSS_CHILD = textwrap.dedent("""
    import dataclasses, json, sys, torch, moekit
    from moekit.weights import materialize, read_config
    from moekit.weights.gguf_import import read_gguf_config
    def rss(key):
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
    def run(model):
        return moekit.Engine(model, kv_cache_bytes=1 << 20, adapt_threads=False).generate(
            [list(range(3, 19))], moekit.SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True))
    torch.set_num_threads(1)
    path = sys.argv[1]  # a one-layer twin first: the runtime's own first-use memory
    cfg = read_gguf_config(path) if path.endswith(".gguf") else read_config(path)[0]
    tiny = materialize(dataclasses.replace(cfg, num_layers=1, vocab_size=64), torch.bfloat16, kernels="reference")
    tiny.init_weights()
    run(tiny)
    before = rss("VmRSS:")
    model = moekit.load(sys.argv[1], max_memory=float(sys.argv[2]), kernels="reference")
    loaded = rss("VmHWM:")
    run(model)
    print(json.dumps({"before": before, "loaded": loaded, "peak": rss("VmHWM:"), "stats": model.offload_stats()}))
""")


@pytest.mark.parametrize("fmt, width, mib, working", [("safetensors", 512, 20, 24), ("q8_0", 512, 10, 40),
                                                      ("q4_k_m", 1024, 46, 24)])
def test_resident_memory_stays_within_the_budget(tmp_path, fmt, width, mib, working):
    """A model with 48 MiB of bfloat16 experts under a 20 MiB budget: loading it grows the process by at
    most the budget (the weights, and a read buffer); generating adds the working memory the budget does
    not cover (activations, KV cache, allocator: about 14 MiB here, as much as for the in-memory model).
    The same from GGUF files: Q8_0 (moekit's export; 25 MiB of int8 experts under 10 MiB, blocks split into
    data and scales on the way in) and Q4_K_M (llama.cpp's quantizer; dequantised on the way in, which
    the budget gives 16 MiB of pieces: 96 MiB of bfloat16 experts under 46 MiB). The int8 model's decode
    on the reference kernels (each matrix dequantised per call) grows the heap by 21-33 MiB, offloaded
    or not (measured), hence its larger allowance for working memory."""
    hf = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 512, "hidden_size": 256,
          "num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": width,
          "num_local_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
          "hidden_act": "silu", "tie_word_embeddings": False}
    from moekit.families import detect_family, get_family

    cfg = get_family(detect_family(hf).name).to_config(hf, frozenset())
    model = moekit.MoEDecoder(cfg)
    model.init_weights(generator=torch.Generator().manual_seed(0))
    path = tmp_path / "m"
    moekit.save(model.to(torch.bfloat16), path)
    if fmt != "safetensors":
        from moekit.weights.gguf_export import export_checkpoint

        qtype = "q8_0" if fmt == "q8_0" else "f16"  # Q4_K_M: llama.cpp quantizes moekit's F16 file
        path = export_checkpoint(path, tmp_path / f"m-{qtype}.gguf", qtype, progress=False)
    if fmt == "q4_k_m":
        llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (.ci/run installs it) quantizes Q4_K_M")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
        assert llama_cpp.llama_model_quantize(str(path).encode(), str(tmp_path / "m-q4_k_m.gguf").encode(), params) == 0
        path = tmp_path / "m-q4_k_m.gguf"
    budget = mib / 1024
    r = subprocess.run([sys.executable, "-c", RSS_CHILD, str(path), str(budget)], capture_output=True,
                       text=True, check=True)
    got = json.loads(r.stdout.strip().splitlines()[-1])
    st = got["stats"]
    assert st["expert_bytes"] > 2 * budget * GIB and st["evictions"] > 0
    assert st["resident_bytes"] + st["capacity_bytes"] + st["buffer_bytes"] <= budget * GIB
    assert got["loaded"] - got["before"] <= budget * GIB + 4 * 2**20, got  # + the loader's own transient objects
    assert got["peak"] - got["before"] <= budget * GIB + working * 2**20, got


def test_cli_max_memory(capsys):
    from moekit.cli import main

    args = ["generate", "--prompt", "In the beginning", "--max-new-tokens", "12", "--temperature", "0"]
    assert main(args) == 0
    in_memory = capsys.readouterr().out
    assert main([*args, "--max-memory", "0.0145"]) == 0
    out = capsys.readouterr()
    assert out.out == in_memory and "expert offload:" in out.err and "hit the cache" in out.err
    assert main([*args, "--max-memory", "0.001"]) == 2
    err = capsys.readouterr().err
    assert "too small" in err and err.count("\n") == 1
