"""Loading streams shard by shard: peak resident memory stays near the model's own size.

safetensors files are memory-mapped in 64 MB windows, so even a single-file
checkpoint adds little; a .bin shard is mapped whole while it is read.
"""

import dataclasses
import json
import subprocess
import sys
import textwrap

import pytest
import torch

import moekit
from moekit.weights.save import hf_tensors

PROBE = textwrap.dedent("""
    import dataclasses, gc, sys, tempfile, torch, moekit
    from moekit.weights import read_config
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    # Warm up on a one-layer copy so that library code paged in by the first load is not counted.
    cfg = read_config(sys.argv[1])[0]
    small = cfg.replace(num_layers=1, vocab_size=64, moe=dataclasses.replace(cfg.moe, expert_width=8, shared_width=16))
    warm = moekit.MoEDecoder(small)
    warm.init_weights()
    warm_dir = tempfile.mkdtemp() + "/w"
    moekit.save(warm, warm_dir)
    moekit.load(warm_dir)
    del warm
    gc.collect()
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS counter
    base = status("VmRSS:")
    model = moekit.load(sys.argv[1], dtype=torch.float32)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    print(status("VmHWM:") - base, size)
""")


def _cfg():
    base = moekit.preset("xverse-moe-a4.2b")
    moe = dataclasses.replace(base.moe, num_experts=16, top_k=4, expert_width=384, shared_width=768)
    return base.replace(
        vocab_size=4096, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=8, head_dim=64, moe=moe,
        bos_token_id=2, eos_token_id=3, pad_token_id=1)


@pytest.mark.slow
@pytest.mark.parametrize("fmt, shard_mb", [("safetensors", 24), ("safetensors", 1024), ("bin", 24)])
def test_peak_memory_while_loading(tmp_path, fmt, shard_mb):
    model = moekit.MoEDecoder(_cfg())
    model.init_weights()
    folder = tmp_path / "ckpt"
    moekit.save(model, folder, max_shard_bytes=shard_mb << 20)
    if fmt == "bin":  # rewrite the same tensors as pickled .bin shards with a bin index (Orion / LLaMA-MoE style)
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        tensors = hf_tensors(model, "xverse")
        shards = {}
        for name, file in index["weight_map"].items():
            shards.setdefault(file.replace("model-", "pytorch_model-").replace(".safetensors", ".bin"), []).append(name)
        for file, names in shards.items():
            torch.save({n: tensors[n].detach().clone() for n in names}, folder / file)
        for f in folder.glob("*.safetensors"):
            f.unlink()
        (folder / "model.safetensors.index.json").unlink()
        wmap = {n: f for f, ns in shards.items() for n in ns}
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wmap}))
    del model
    out = subprocess.run([sys.executable, "-c", PROBE, str(folder)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    peak, size = map(int, out.stdout.split())
    assert size > 150e6
    assert peak < 1.3 * size, f"peak {peak / 1e6:.0f} MB for a {size / 1e6:.0f} MB model"
