"""What bench/serve.py serves: one Mixtral-shaped random-weight checkpoint, its GGUF, and llama.cpp's server.

Everything is built once into a cache folder (``--cache``, default ~/.cache/moekit) and reused:

- ``checkpoint``: bench/cpu_generate.py's Mixtral shape (742M parameters, 8 x 3584 experts, top-2,
  GQA 16/4; context 8192 here) with seeded random bf16 weights, saved by moekit in Mixtral's Hugging Face layout, plus a
  SentencePiece BPE tokenizer (LLaMA-2 style: byte fallback, <unk>/<s>/</s> = 0/1/2) trained on the King
  James Bible (Debian's bible-kjv-text, installed with apt as recipes/kjv does) at the checkpoint's
  vocabulary size, so that all three servers read the same text the same way;
- ``llama-server``: built with CMake from the llama.cpp that the ``llama-cpp-python`` sdist vendors
  (downloaded from PyPI by pip), for this CPU (GGML_NATIVE);
- ``model-<type>.gguf``: the checkpoint converted by that llama.cpp's own ``convert_hf_to_gguf.py``.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LLAMA_CPP_PYTHON = "0.3.36"  # the sdist whose vendored llama.cpp is built


def log(msg: str) -> None:
    print(f"[setup] {msg}", file=sys.stderr, flush=True)


def kjv_lines() -> list[str]:
    """One verse per line, through recipes/kjv/prepare.py (installs bible-kjv with apt if needed)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("kjv_prepare", ROOT / "recipes" / "kjv" / "prepare.py")
    kjv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kjv)
    return [line for line in kjv.clean(kjv.dump_kjv()).splitlines() if line.strip()]


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """tokenizer.model (SentencePiece BPE, byte fallback) + tokenizer_config.json for LlamaTokenizer."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(kjv_lines()), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        add_dummy_prefix=True, normalization_rule_name="identity", num_threads=os.cpu_count() or 1,
        minloglevel=2)
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    specials = {"0": "<unk>", "1": "<s>", "2": "</s>"}
    cfg = {"tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>",
           "add_bos_token": True, "add_eos_token": False, "legacy": False, "model_max_length": 8192,
           "added_tokens_decoder": {i: {"content": t, "special": True} for i, t in specials.items()}}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))


def checkpoint(cache: Path) -> Path:
    """The Mixtral-shaped bf16 checkpoint with its tokenizer (built once)."""
    folder = cache / "bench-serve" / "mixtral-bf16"
    if (folder / "tokenizer.model").exists() and (folder / "config.json").exists():
        return folder
    sys.path.insert(0, str(HERE))
    from cpu_generate import SHAPES, write_checkpoint

    log(f"writing the Mixtral-shaped checkpoint to {folder}")
    hf = dict(SHAPES["mixtral"], max_position_embeddings=8192)  # room for 4k-token prompts plus the answer
    write_checkpoint(hf, torch.bfloat16, folder)
    log("training its SentencePiece tokenizer on the KJV")
    write_tokenizer(folder, hf["vocab_size"])
    return folder


def llama_source(cache: Path) -> Path:
    """llama.cpp as vendored by the llama-cpp-python sdist (pip download, no build of the binding)."""
    src = cache / f"llama-cpp-python-{LLAMA_CPP_PYTHON}" / "src"
    if (src / "CMakeLists.txt").exists():
        return src
    with tempfile.TemporaryDirectory() as tmp:
        log(f"downloading the llama-cpp-python {LLAMA_CPP_PYTHON} sdist")
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", tmp], check=True)
        sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        vendored = next(Path(tmp).glob("llama_cpp_python-*/vendor/llama.cpp"))
        src.parent.mkdir(parents=True, exist_ok=True)
        vendored.rename(src)
    return src


def llama_server(cache: Path) -> Path:
    """The llama-server binary (CMake Release build for this CPU; several minutes on 2 cores, once)."""
    src = llama_source(cache)
    build = src.parent / "build"
    binary = build / "bin" / "llama-server"
    if binary.exists():
        return binary
    log(f"building llama-server from {src} (several minutes)")
    subprocess.run(["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
                    "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                    "-DLLAMA_BUILD_EXAMPLES=OFF"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(os.cpu_count() or 1)],
                   check=True)
    return binary


def gguf(folder: Path, cache: Path, outtype: str) -> Path:
    """The checkpoint converted by llama.cpp's convert_hf_to_gguf.py (its own gguf-py) at ``outtype``."""
    out = cache / "bench-serve" / f"mixtral-{outtype}.gguf"
    if out.exists():
        return out
    src = llama_source(cache)
    log(f"converting {folder} to {out.name} with llama.cpp's converter")
    env = dict(os.environ, PYTHONPATH=str(src / "gguf-py"))
    part = out.with_name(out.name + ".part")
    subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(folder), "--outtype", outtype,
                    "--outfile", str(part)], check=True, env=env, stdout=subprocess.DEVNULL)
    part.rename(out)
    return out


def build_all(cache: Path, outtype: str, llama: bool = True) -> tuple[Path, Path | None, Path | None]:
    """(checkpoint folder, GGUF file, llama-server binary); the last two only with ``llama``."""
    cache.mkdir(parents=True, exist_ok=True)
    folder = checkpoint(cache)
    if not llama:
        return folder, None, None
    return folder, gguf(folder, cache, outtype), llama_server(cache)


def kv_bytes_per_token(folder: Path) -> int:
    """K and V of every layer for one token in bf16, from the checkpoint's config.json."""
    hf = json.loads((folder / "config.json").read_text())
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    return 2 * hf["num_hidden_layers"] * hf.get("num_key_value_heads", hf["num_attention_heads"]) * head_dim * 2
