"""The moekit command line, end to end in a subprocess."""

import subprocess
import sys


def run(*args):
    return subprocess.run([sys.executable, "-m", "moekit.cli", *args], capture_output=True, text=True, timeout=120)


def test_info_preset_prints_published_counts():
    r = run("info", "xverse-moe-a4.2b")
    assert r.returncode == 0, r.stderr
    assert "25.78B total, 4.23B active" in r.stdout
    assert "64 routed x 1728, top-6" in r.stdout and "shared:       width 3456, ungated" in r.stdout
    assert "MoE 0-27; dense none" in r.stdout


def test_info_shows_leading_dense_layers():
    r = run("info", "deepseek-moe-16b")
    assert r.returncode == 0, r.stderr
    assert "MoE 1-27; dense 0 (FFN width 10944)" in r.stdout


def test_info_unknown_target_is_one_line_error():
    r = run("info", "/no/such/model")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "neither a checkpoint folder nor a preset" in r.stderr
    assert "Traceback" not in r.stderr
