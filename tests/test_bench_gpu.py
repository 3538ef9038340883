"""bench/gpu.py's CPU-side logic: floors (checked against performance.md's worked numbers), tables, smoke run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import moekit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_report as rep  # noqa: E402

BW, PEAK = 2.94e12, 771e12  # performance.md section 10's probes


def test_decode_floor_matches_the_worked_xverse_numbers():
    cfg = moekit.preset("xverse-moe-a4.2b")
    assert 7.9e9 < rep.decode_bytes(cfg, 1, 64) < 8.0e9  # "7.94 GB read per token"
    b16 = rep.decode_bytes(cfg, 16, 64)
    assert 39e9 < b16 < 43e9 and 1050 < 16 * BW / b16 < 1200  # "about 40 GB per step", "about 1,100" tok/s
    assert rep.expected_touched(64, 6, 1) == pytest.approx(6) and rep.expected_touched(64, 6, 64) > 63


def test_prefill_and_block_floors():
    cfg = moekit.preset("xverse-moe-a4.2b")
    assert 90e3 < 2048 * PEAK / rep.prefill_flops(cfg, 2048) < 105e3  # "about 92,000" (all-position logits)
    assert rep.prefill_flops(cfg, 4096) > 2 * rep.prefill_flops(cfg, 2048)  # attention grows quadratically
    # section 10's block floors, ms: XVERSE shape 1 and 4096 tokens, Orion shape 1 and 4096 tokens
    assert 1e3 * rep.block_floor_s(2560, 1728, 64, 6, 3456, 1, 6, BW, PEAK) == pytest.approx(0.072, abs=1e-3)
    assert 1e3 * rep.block_floor_s(2560, 1728, 64, 6, 3456, 4096, 64, BW, PEAK) == pytest.approx(1.13, abs=0.01)
    assert 1e3 * rep.block_floor_s(4096, 14592, 8, 2, 0, 1, 2, BW, PEAK) == pytest.approx(0.24, abs=0.01)
    assert 1e3 * rep.block_floor_s(4096, 14592, 8, 2, 0, 4096, 8, BW, PEAK) == pytest.approx(3.81, abs=0.01)


def result(**extra):
    r = {"date": "2026-11-23 10:00", "command": "PYTHONPATH=. python3 bench/gpu.py", "errors": ["x: OOM"],
         "device": {"gpu": "H100", "driver": "580", "cuda": "12.8", "torch": "2.11", "triton": "3.6",
                    "transformers": "5.17"}, "probes": {"copy_tbs": 2.94, "matmul_tflops": 771.0}}
    r.update(extra)
    return r


def test_markdown_tables(tmp_path):
    block = {"xverse": [{"tokens": 1, "shape_text": "d 2560", "moekit_ms": 0.1, "path": "decode", "decode_ms": 0.1,
                         "grouped_ms": 0.2, "floor_ms": 0.072, "hf_ms": {"eager": 2.0, "batched_mm": None,
                                                                         "grouped_mm": 1.0}},
                        {"tokens": 16, "shape_text": "d 2560", "moekit_ms": 1.0, "path": "decode", "floor_ms": 0.6,
                         "hf_ms": {"eager": None}, "max_rel_diff_vs_transformers": 0.008}]}
    model = {"name": "xverse-moe-a4.2b", "params": 25.8e9, "active": 4.2e9, "layers": 28, "prefill_tokens": 2048,
             "hf_class": "Qwen2MoeForCausalLM", "moekit": {"decode_b1": 300.0, "prefill": 50000.0},
             "transformers": {"decode_b1": {"static cache, compiled": 90.0, "default cache": 20.0},
                              "prefill": {"grouped_mm": 25000.0}},
             "floors": {"decode_b1": 370.0, "decode_b16": 1100.0, "prefill": 92000.0}}
    md = rep.markdown(result(block=block, model=model))
    assert "| decode, batch 1 (tok/s) | 300.0 | 81% | 90.0 (static cache, compiled) | 24% | 3.33x | 370 |" in md
    assert "| decode, batch 16 (tok/s) | n/a |  | n/a |  |  | 1,100 |" in md
    assert "| 1 | 0.100 | decode | 0.100 | 0.200 | 1.000 (grouped_mm) | 0.072 | 72% | 10.00x |" in md
    assert "| 16 | 1.000 | decode | n/a | n/a | n/a | 0.600 | 60% |  |" in md
    assert "differ by 8.0e-03" in md and "- x: OOM" in md
    rep.save(result(), tmp_path, "gpu-test")  # partial results (probes only) still write both files
    assert json.loads((tmp_path / "gpu-test.json").read_text())["probes"]["copy_tbs"] == 2.94
    assert (tmp_path / "gpu-test.md").read_text().startswith("2026-11-23 10:00, H100")


@pytest.mark.slow
def test_smoke_run_end_to_end(tmp_path):
    """The whole script on tiny shapes, CPU, TRITON_INTERPRET=1 (its own process)."""
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "bench/gpu.py"), "--smoke", "--shapes", "mixtral"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(next(tmp_path.glob("gpu-*-smoke.json")).read_text())
    assert [row["tokens"] for row in r["block"]["mixtral"]] == [1, 2, 4]
    assert r["block"]["mixtral"][-1]["max_rel_diff_vs_transformers"] < 0.05  # same weights, same function
    assert r["model"]["moekit"]["kernels"] == "triton" and r["model"]["moekit"]["decode_b1"] > 0
    assert r["model"]["transformers"]["prefill"]["grouped_mm"] > 0
