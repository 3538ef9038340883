"""Saves for tests/test_kill_during_save.py, each in a forked child that the test SIGKILLs mid-write.

Usage: python tests/save_worker.py   (one JSON command a line on stdin)
  {"kind": "hf", "target": DIR, "variant": 0 | 1}       moekit.save of model variant 0 or 1
  {"kind": "train", "root": DIR, "step": N}             a training checkpoint of step N
Prints "ready" once, then per command "start <pid>" (from the child, as it begins to save) and
"exit <wait status> <seconds>". Imports and models are made once, before the forks; torch runs
one thread, so forking is safe. The models' values say what they are (see ``hf_model`` /
``train_state``), so a test can tell an old checkpoint, a new one and a mix apart.
"""

import json
import os
import sys
import time
import traceback

import torch

from moekit.families import detect_family
from moekit.models import MoEDecoder

HF_LAYERS = (3, 4)  # the variants differ in shape too: a mix cannot load as either
TRAIN_MODEL = {"model_type": "xverse", "architectures": ["XverseForCausalLM"], "vocab_size": 2048, "hidden_size": 128,
               "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "num_experts": 8,
               "moe_top_k": 2, "num_shared_experts": 1, "max_position_embeddings": 128}
TINY_MODEL = {**TRAIN_MODEL, "vocab_size": 64, "hidden_size": 32, "intermediate_size": 16, "num_hidden_layers": 2,
              "num_experts": 4, "max_position_embeddings": 64}


def hf_config(layers: int) -> dict:
    return {"model_type": "xverse", "architectures": ["XverseForCausalLM"], "vocab_size": 4096, "hidden_size": 256,
            "intermediate_size": 512, "num_hidden_layers": layers, "num_attention_heads": 8, "num_experts": 8,
            "moe_top_k": 2, "num_shared_experts": 1, "max_position_embeddings": 256, "torch_dtype": "float32"}


def hf_value(variant: int) -> float:
    return (variant + 1) / 4


def hf_model(variant: int) -> MoEDecoder:
    """About 50 MB (variant 0) or 65 MB (variant 1) of float32, every weight equal to hf_value(variant)."""
    hf = hf_config(HF_LAYERS[variant])
    model = MoEDecoder(detect_family(hf).to_config(hf), kernels="reference")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(hf_value(variant))
    return model


def train_model(hf: dict = TRAIN_MODEL):
    """A model and its AdamW optimizer, with optimizer state."""
    model = MoEDecoder(detect_family(hf).to_config(dict(hf)), kernels="reference")
    model.init_weights(generator=torch.Generator().manual_seed(0))  # not uninitialised memory (NaN != NaN)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # creates the optimizer state
    return model, opt


def train_state(model, opt, step: int) -> None:
    """Weights step / 8, Adam moments step and 2 * step: the checkpoint of ``step`` is recognisable."""
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(step / 8)
            opt.state[p]["exp_avg"].fill_(step)
            opt.state[p]["exp_avg_sq"].fill_(2 * step)


def main() -> None:
    from moekit import save
    from moekit.train import checkpoint

    torch.set_num_threads(1)
    hf = [hf_model(0), hf_model(1)]
    model, opt = train_model()
    print("ready", flush=True)
    while line := sys.stdin.readline():
        cmd = json.loads(line)
        if cmd["kind"] == "train":
            train_state(model, opt, cmd["step"])
        t0 = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                print(f"start {os.getpid()}", flush=True)
                if cmd["kind"] == "hf":
                    save(hf[cmd["variant"]], cmd["target"], max_shard_bytes=8 << 20)
                else:
                    checkpoint.save(cmd["root"], cmd["step"], model, opt, {"mixture": {}}, keep=2)
            except BaseException:
                traceback.print_exc()
                code = 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        print(f"exit {status} {time.perf_counter() - t0:.3f}", flush=True)


if __name__ == "__main__":
    main()
