"""Weight conversion while loading: moekit's C++ kernels (moekit/kernels/cpu/convert.cpp) against the
reference backend's conversion (gguf-py's numpy dequantisation, which moekit used before; PyTorch
quantisation, kernels/weights.py) and against the memory floor.

    python bench/weight_convert.py --out bench/results/DATE/weight-convert.json
    python bench/weight_convert.py --files ~/.cache/moekit/bench-quant/mixtral-q4_k_m.gguf --no-kernels

Two measurements, on the same machine in one run:

- kernels, on a 4096 x 4096 matrix, median of ``--reps``: GGUF dequantisation of each type from random
  blocks (every bit pattern valid; float16 scales finite) to float32, a piece of rows at a time as the
  loader calls it (gguf_tensors.PIECE: 1 MiB of float32 values); and quantisation of bfloat16 values to
  int8 (per channel) and int4 (group 64), the whole matrix in one call; values per second for the
  reference and moekit; for quantisation also moekit's share of the floor, the time to read the input and
  write the output at the bandwidth a plain copy of a 256 MiB tensor reaches here (a dequantised piece
  stays in the CPU's caches, so that floor does not bound it);
- loads: each GGUF file of ``--files`` (default: the K-quant files in ~/.cache/moekit/bench-quant)
  loaded by ``moekit.load`` in a fresh process with the reference backend and with the CPU backend,
  as bfloat16 and with ``quantize="int4"``; seconds, best of ``--load-reps``. The file is read once
  before, so every load reads from the page cache. The CPU backend also asks for transparent huge pages
  under the weights (``cpu.advise_weights``, for decode speed); where the kernel's THP defrag setting is
  "madvise", their first touch can compact memory, which the reference backend's load does not pay.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moekit.kernels import cpu, reference  # noqa: E402
from moekit.kernels.weights import quantize_into  # noqa: E402
from moekit.weights.gguf_tensors import PIECE  # noqa: E402
from moekit.machine import cpu_info  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from cpu_threads import median_us  # noqa: E402

QUANT = Path.home() / ".cache" / "moekit" / "bench-quant"
# GGML type -> byte offsets of its float16 super-block scales (ggml-common.h)
HALVES = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "IQ3_XXS": (0,)}


def random_blocks(kind: str, rows: int, K: int, seed: int = 0) -> torch.Tensor:
    """Rows of K values in random ``kind`` blocks: random bytes, the float16 scales drawn from N(0, 0.01)
    (every other bit pattern is a valid block; tests/test_kernels_convert.py uses these too)."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, K // block, size), dtype=np.uint8)
    for at in HALVES[kind]:
        raw[..., at:at + 2] = (rng.standard_normal((rows, K // block, 1)) * 0.01).astype(np.float16).view(np.uint8)
    return torch.from_numpy(raw.reshape(rows, -1))


def timed(fn, reps: int) -> float:
    """Median seconds of ``reps`` calls after a warm-up (bench/cpu_threads.py's median_us)."""
    return median_us(fn, reps) / 1e6


def copy_bandwidth(reps: int) -> float:
    """Bytes per second of a plain copy (read + write counted) of a 256 MiB tensor."""
    a, b = torch.empty(64 << 20), torch.empty(64 << 20)
    a.fill_(1.0)
    return 2 * a.numel() * 4 / timed(lambda: b.copy_(a), reps)


def kernels(reps: int) -> list[dict]:
    kern, rows, K = cpu.CpuKernels(torch.bfloat16), 4096, 4096
    bw, out = copy_bandwidth(reps), []
    for kind in sorted(HALVES):
        raw = random_blocks(kind, rows, K)
        assert torch.equal(kern.dequantize(raw, kind, K), reference.dequantize(raw, kind, K)), kind
        step = PIECE // (4 * K)

        def pieces(fn):
            for r in range(0, rows, step):
                fn(raw[r:r + step], kind, K)

        ref = timed(lambda: pieces(reference.dequantize), max(1, reps // 3))
        fast = timed(lambda: pieces(kern.dequantize), reps)
        out.append(row(f"dequantize {kind}", rows * K, ref, fast, None, bw))
    w = torch.randn(rows, K).to(torch.bfloat16)
    for fmt, group in (("int8", K), ("int4", 64)):
        data = torch.empty(rows, K // 2 if fmt == "int4" else K, dtype=torch.uint8 if fmt == "int4" else torch.int8)
        scale = torch.empty(rows, K // group, dtype=torch.float16)
        ref = timed(lambda: quantize_into(w, data, scale, torch.bfloat16), reps)
        fast = timed(lambda: kern.quantize_into(w, data, scale, torch.bfloat16), reps)
        floor = (w.numel() * 2 + data.numel() + scale.numel() * 2) / bw
        out.append(row(f"quantize bf16 -> {fmt}", rows * K, ref, fast, floor, bw))
    return out


def row(what: str, values: int, ref: float, fast: float, floor: float | None, bw: float) -> dict:
    r = {"what": what, "reference_mvals": values / ref / 1e6, "moekit_mvals": values / fast / 1e6,
         "speedup": ref / fast, "of_floor": floor and floor / fast, "copy_gbs": bw / 1e9}
    of = f"; {100 * r['of_floor']:.0f}% of the floor" if floor else ""
    print(f"{what:22s} reference {r['reference_mvals']:7.0f} M values/s  moekit {r['moekit_mvals']:7.0f}"
          f"  ({r['speedup']:.1f}x{of})", flush=True)
    return r


LOAD = """
import json, sys, time, torch, moekit
torch.set_num_threads(int(sys.argv[4]))
t0 = time.perf_counter()
m = moekit.load(sys.argv[1], kernels=sys.argv[2], quantize=sys.argv[3] or None, progress=False)
print(json.dumps(time.perf_counter() - t0))
"""


def loads(files: list[Path], reps: int, threads: int) -> list[dict]:
    out = []
    for f in files:
        with open(f, "rb") as fh:  # into the page cache
            while fh.read(64 << 20):
                pass
        for quantize in ("", "int4"):
            r = {"file": f.name, "bytes": f.stat().st_size, "quantize": quantize or None}
            for kernels_ in ("reference", "cpu"):
                secs = []
                for _ in range(reps):
                    p = subprocess.run([sys.executable, "-c", LOAD, str(f), kernels_, quantize, str(threads)],
                                       capture_output=True, text=True, check=True, cwd=ROOT)
                    secs.append(json.loads(p.stdout.strip().splitlines()[-1]))
                r[kernels_] = min(secs)
            r["speedup"] = r["reference"] / r["cpu"]
            out.append(r)
            print(f"{f.name} {quantize or 'bf16':5s} reference {r['reference']:6.1f} s  moekit {r['cpu']:6.1f} s"
                  f"  ({r['speedup']:.1f}x)", flush=True)
    return out


def k_quant_files() -> list[Path]:
    """The bench model's K-quant files: Q4_K_M (bench/offload.py's), and Q2_K and Q3_K_M (APUS's release types)
    written here from its bf16 file by llama.cpp's quantizer when absent."""
    src, out = QUANT / "mixtral-bf16.gguf", []
    for ftype in ("Q2_K", "Q3_K_M", "Q4_K_M"):
        f = QUANT / f"mixtral-{ftype.lower()}.gguf"
        if not f.exists() and src.exists():
            import llama_cpp

            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
            tmp = f.with_suffix(".tmp")
            if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params) != 0:
                raise SystemExit(f"llama.cpp could not quantise {src} to {ftype}")
            tmp.rename(f)
        if f.exists():
            out.append(f)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=Path, nargs="*", help="GGUF files to load (default: K-quant bench files)")
    ap.add_argument("--reps", type=int, default=9, help="kernel repetitions (gguf-py: a third)")
    ap.add_argument("--load-reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--no-kernels", action="store_true", help="the loads only")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    files = args.files if args.files is not None else k_quant_files()
    print(f"{cpu_info()['model']}, {args.threads} threads", flush=True)
    res = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_info()["model"], "threads": args.threads,
           "command": "python " + " ".join(sys.argv),
           "kernels": [] if args.no_kernels else kernels(args.reps)}
    res["loads"] = loads(files, args.load_reps, args.threads)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
