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


def test_info_kernels_names_the_machine_and_each_ops_path():
    from moekit.kernels import cpu
    from moekit.machine import cpu_info

    r = run("info", "mixtral-8x7b", "--kernels", "--dtype", "bfloat16")
    assert r.returncode == 0, r.stderr
    assert f"machine: {cpu_info()['model'] or 'unknown CPU'}" in r.stdout and "ISA: " in r.stdout
    if cpu.supported():
        assert "kernels: cpu (" in r.stdout and "  experts: moekit fused MoE; experts with >= 16 tokens: " in r.stdout
    r = run("info", "mixtral-8x7b", "--kernels", "--dtype", "float16")
    assert "kernels: reference (auto: " in r.stdout and "float16" in r.stdout


def test_info_unknown_target_is_one_line_error():
    r = run("info", "/no/such/model")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "neither a checkpoint folder nor a preset" in r.stderr
    assert "Traceback" not in r.stderr


def test_generate_greedy_and_stream_print_the_same_text(text_checkpoint):
    model = str(text_checkpoint("xverse"))
    args = ["generate", "--model", model, "--prompt", "北京的景点：", "--max-new-tokens", "12", "--temperature", "0"]
    plain, streamed = run(*args), run(*args, "--stream")
    assert plain.returncode == 0 and streamed.returncode == 0, plain.stderr + streamed.stderr
    assert plain.stdout == streamed.stdout and plain.stdout.strip()
    assert "loaded" in plain.stderr and "shard" in plain.stderr  # loading shows progress


def test_generate_chat_flag_and_sampling_knobs(text_checkpoint):
    model = str(text_checkpoint("llama_moe"))
    args = ["generate", "--model", model, "--prompt", "Hi", "--chat", "--system", "Be brief.", "--max-new-tokens",
            "8", "--temperature", "0.7", "--top-k", "20", "--top-p", "0.9", "--min-p", "0.05",
            "--repetition-penalty", "1.1", "--presence-penalty", "0.5", "--frequency-penalty", "0.2",
            "--seed", "3", "--stop", "zz", "--stop-token-id", "5"]
    a, b = run(*args), run(*args)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout  # seeded


def test_interactive_chat_reset_and_exit(text_checkpoint):
    model = str(text_checkpoint("xverse"))
    r = subprocess.run([sys.executable, "-m", "moekit.cli", "chat", "--model", model, "--max-new-tokens", "5",
                        "--temperature", "0"], input="hello\nagain\n/reset\nhello\n/exit\n", capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    replies = [line for line in r.stdout.split("> ") if line.strip()]
    assert len(replies) == 3 and replies[0] == replies[2]  # after /reset the same question gets the same answer
    assert "(conversation reset)" in r.stderr


def test_generate_errors_are_one_line(text_checkpoint, tmp_path):
    for args, msg in [(["--model", str(tmp_path / "missing")], "no such checkpoint folder"),
                      (["--model", str(text_checkpoint("xverse")), "--top-p", "3"], "top_p=3.0 is invalid")]:
        r = run("generate", "--prompt", "x", *args)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr
    (tmp_path / "bad").mkdir()
    r = run("generate", "--prompt", "x", "--model", str(tmp_path / "bad"))
    assert r.returncode == 2 and "config.json: file not found" in r.stderr and r.stderr.count("\n") == 1
