"""int8 / int4 weights: the storage formats (against gguf-py's own Q8_0 / Q4_0 decoders), quantising
models of every family, quantised checkpoints in and out, and bad quantised checkpoints."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import moekit
from moekit.kernels.weights import QUANT_PIECE, QuantWeight, pack_int4, unpack_int4
from moekit.models.quantize import QuantConfig, quantize_model
from moekit.weights import CheckpointError
from tests.conftest import CASE_IDS

g = torch.Generator().manual_seed(0)


@pytest.mark.parametrize("fmt, group", [("int8", None), ("int8", 32), ("int8", 64), ("int4", 32), ("int4", 64),
                                        ("int4", 128)])
def test_round_to_nearest_within_half_a_step(fmt, group):
    w = torch.randn(3, 16, 256, generator=g) * torch.rand(3, 16, 1, generator=g)  # rows of different ranges
    w[0, 0] = 0  # an all-zero row
    q = QuantWeight.quantize(w, fmt, group)
    scale = q.scale.float().repeat_interleave(q.group, -1)
    err = (q.dequantize() - w).abs()
    assert (err <= scale / 2 + 1e-7).all()
    assert q.dequantize()[0, 0].abs().max() == 0
    assert q.values().abs().max() <= (127 if fmt == "int8" else 8)
    for i in range(3):  # one matrix of a stack equals the stack's slice
        torch.testing.assert_close(q.dequantize(torch.float32, index=i), q.dequantize()[i], rtol=0, atol=0)


def test_int4_packing_round_trips():
    q = torch.randint(-8, 8, (4, 96), generator=g)
    assert torch.equal(unpack_int4(pack_int4(q)), q.to(torch.int8))


@pytest.mark.parametrize("fmt, qtype", [("int4", "Q4_0"), ("int8", "Q8_0")])
def test_group_32_layouts_are_ggufs_own(fmt, qtype):
    """Our group-32 bytes, framed as GGUF blocks (float16 scale + quants), decode in gguf-py to our values."""
    gguf = pytest.importorskip("gguf")
    w = torch.randn(8, 128, generator=g)
    q = QuantWeight.quantize(w, fmt, 32)
    per_block = 16 if fmt == "int4" else 32
    quants = q.data.view(torch.uint8).numpy().reshape(8, 4, per_block)
    scales = q.scale.numpy().reshape(8, 4, 1).view(np.uint8)  # float16 -> its 2 bytes
    blocks = np.concatenate([scales, quants], axis=-1).reshape(8, -1)
    t = getattr(gguf.GGMLQuantizationType, qtype)
    decoded = gguf.quants.dequantize(blocks, t)
    np.testing.assert_array_equal(decoded, q.dequantize().numpy())


def test_storage_format_survives_dtype_casts():
    q = QuantWeight.quantize(torch.randn(4, 64, generator=g), "int4", 32)
    before = q.dequantize()
    q = q.to(torch.bfloat16).float().half()
    assert (q.data.dtype, q.scale.dtype) == (torch.uint8, torch.float16)
    assert torch.equal(q.dequantize(), before)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).float()


@pytest.mark.parametrize("case", CASE_IDS)
def test_every_family_quantises_saves_and_loads(case, checkpoints, input_ids, tmp_path):
    folder, _, _ = checkpoints(case)
    model = moekit.load(folder, dtype=torch.float32, kernels="reference")
    q = quantize_model(model, QuantConfig.of("int8", 32))
    got = _logits(model, input_ids)
    twin = moekit.load(folder, dtype=torch.float32, kernels="reference")  # float weights set to the dequantised ones
    for name, m in model.named_modules():
        if isinstance(m, QuantWeight):
            owner, attr = twin.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1]
            getattr(owner, attr).data.copy_(m.dequantize())
    assert any(isinstance(m, QuantWeight) for m in model.modules())
    torch.testing.assert_close(got, _logits(twin, input_ids), rtol=1e-5, atol=1e-5)
    moekit.save(model, tmp_path / "q")
    header = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert header == q.to_json()
    again = moekit.load(tmp_path / "q", kernels="reference")
    assert again.quant == q
    assert torch.equal(_logits(again, input_ids), got)
    at_load = moekit.load(folder, dtype=torch.float32, kernels="reference", quantize="int8", group=32)
    assert torch.equal(_logits(at_load, input_ids), got)


def test_int4_checkpoint_is_smaller_and_matches_in_memory(checkpoints, input_ids, tmp_path):
    folder, _, _ = checkpoints("mixtral")
    model = moekit.load(folder, dtype=torch.bfloat16, kernels="reference", quantize="int4", group=32)
    quantised = [n for n, m in model.named_modules() if isinstance(m, QuantWeight)]
    assert any(n.endswith("experts.w13") for n in quantised) and "lm_head.weight" in quantised
    moekit.save(model, tmp_path / "q4")
    moekit.save(moekit.load(folder, dtype=torch.bfloat16), tmp_path / "bf16")
    size = lambda d: sum(f.stat().st_size for f in d.glob("*.safetensors"))  # noqa: E731
    assert size(tmp_path / "q4") < 0.6 * size(tmp_path / "bf16")
    assert torch.equal(_logits(moekit.load(tmp_path / "q4", kernels="reference"), input_ids), _logits(model, input_ids))


QUANTISED_LOAD = """
import json, sys, torch, moekit
def rss(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))
torch.set_num_threads(1)
moekit.load(sys.argv[2], quantize="int4", group=32, kernels="reference")  # a tiny twin: first-use memory
before = rss("VmRSS:")
model = moekit.load(sys.argv[1], quantize="int4", group=32, kernels="reference")
weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
print(json.dumps({"grew": rss("VmHWM:") - before, "weights": weights}))
"""


def test_quantize_at_load_never_holds_the_float_model(tmp_path):
    """quantize= quantises each matrix as it is read: loading 96 MiB of bfloat16 weights as int4 grows the
    process by the int4 model (about a third), one shard's mapped pages (4 MiB), one float32 piece and the
    allocator's slack (4 MiB each; 1.3-7.8 MiB of all three were measured over the model), not by the
    bfloat16 model."""
    import subprocess
    import sys

    from moekit.families import get_family

    def write(folder, layers):
        hf = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 512,
              "hidden_size": 256, "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2,
              "intermediate_size": 512, "num_local_experts": 8, "num_experts_per_tok": 2,
              "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
        model = moekit.MoEDecoder(get_family("mixtral").to_config(hf, frozenset()))
        model.init_weights(generator=torch.Generator().manual_seed(0))
        moekit.save(model.to(torch.bfloat16), folder, max_shard_bytes=4 << 20)  # mapped pages: one shard at most
        return sum(p.numel() * 2 for p in model.parameters())

    bf16 = write(tmp_path / "m", 16)
    write(tmp_path / "twin", 1)
    r = subprocess.run([sys.executable, "-c", QUANTISED_LOAD, str(tmp_path / "m"), str(tmp_path / "twin")],
                       capture_output=True, text=True, check=True)
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["weights"] < 0.35 * bf16
    assert got["grew"] <= got["weights"] + (4 << 20) + QUANT_PIECE + (4 << 20) < 0.5 * bf16, got


def test_widths_the_group_does_not_divide_stay_in_floating_point(checkpoints):
    folder, _, _ = checkpoints("llama_moe-uneven")  # experts of widths 8, 16, 24, 16
    model = moekit.load(folder, dtype=torch.float32, kernels="reference", quantize="int8", group=32)
    padded = [m for m in model.modules() if type(m).__name__ == "Experts" and m.padded]
    assert padded and all(not isinstance(m.w2, QuantWeight) for m in padded)


def _quantised_checkpoint(checkpoints, tmp_path):
    folder, _, _ = checkpoints("mixtral")
    moekit.save(moekit.load(folder, quantize="int8"), tmp_path / "q")
    return tmp_path / "q"


def _edit_shard(folder, edit):
    shard = next(folder.glob("*.safetensors"))
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    wmap = json.loads(index.read_text())
    wmap["weight_map"] = {n: shard.name for n in tensors}
    index.write_text(json.dumps(wmap))


def test_missing_scale_is_named(checkpoints, tmp_path):
    folder = _quantised_checkpoint(checkpoints, tmp_path)
    name = "model.layers.0.block_sparse_moe.experts.1.w2.weight_scale"
    _edit_shard(folder, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=f"missing tensor '{name}'"):
        moekit.load(folder)


def test_float_where_int8_belongs_is_named(checkpoints, tmp_path):
    folder = _quantised_checkpoint(checkpoints, tmp_path)
    name = "model.layers.1.self_attn.o_proj.weight"
    _edit_shard(folder, lambda t: t.__setitem__(name, t[name].float()))
    with pytest.raises(CheckpointError, match=f"{name}.*holds F32; a quantised weight stores I8"):
        moekit.load(folder)


def test_foreign_or_bad_quantization_config_is_refused(checkpoints, tmp_path):
    folder = _quantised_checkpoint(checkpoints, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    for bad, field in [({"quant_method": "gptq", "bits": 4}, "quant_method"), ({**cfg["quantization_config"],
                                                                                "format": "int3"}, "int3")]:
        (folder / "config.json").write_text(json.dumps({**cfg, "quantization_config": bad}))
        with pytest.raises(CheckpointError, match=f"config.json.*quantization_config.*{field}"):
            moekit.load(folder)
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="already quantised"):
        moekit.load(folder, quantize="int4")
    with pytest.raises(moekit.MoekitError, match="int4 group size 48"):
        moekit.load(checkpoints("mixtral")[0], quantize="int4", group=48)


def test_cli_quantize_then_generate(tmp_path, capsys):
    from moekit.cli import main

    assert main(["quantize", "--bits", "4", "--group", "32", "--out", str(tmp_path / "q4")]) == 0
    assert "int4, group 32" in capsys.readouterr().err
    args = ["generate", "--prompt", "In the beginning", "--max-new-tokens", "8", "--temperature", "0"]
    assert main([*args, "--model", str(tmp_path / "q4")]) == 0
    from_file = capsys.readouterr().out
    assert main([*args, "--quantize", "int4", "--group", "32"]) == 0  # the embedded model, quantised at load
    assert capsys.readouterr().out == from_file and from_file.strip()
