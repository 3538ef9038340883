"""Bad input to generation, chat, loading and plotting: one named line and exit 2 (130 for Ctrl-C), never a traceback,
and never a silent wrong answer."""

import importlib
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import moekit
from moekit import CheckpointError
from moekit.cli import main


def run(*args, **kw):
    return subprocess.run([sys.executable, "-m", "moekit.cli", *args], capture_output=True, timeout=120, **kw)


def cli(capsys, *args):
    """moekit in this process: (exit code, stderr)."""
    try:
        rc = main(list(args))
    except SystemExit as e:  # argparse
        rc = e.code
    return rc, capsys.readouterr().err


def one_line(rc, err, *names):
    assert rc == 2 and "Traceback" not in err and err.count("\n") == 1, err
    for name in names:
        assert name in err, (name, err)


@pytest.fixture
def xverse(checkpoints, tmp_path):
    folder = tmp_path / "xv"
    shutil.copytree(checkpoints("xverse")[0], folder)
    return folder


def rewrite(folder, name, value):
    shard = folder / "model-00002-of-00002.safetensors"
    tensors = load_file(shard)
    tensors[name] = value(tensors[name])
    save_file(tensors, shard, metadata={"format": "pt"})
    return shard


def test_nan_weight_is_refused_naming_file_and_tensor(xverse):
    rewrite(xverse, "model.layers.1.mlp.router.weight", lambda t: t.index_fill(1, torch.tensor([3]), float("nan")))
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors: tensor "
                                              r"'model\.layers\.1\.mlp\.router\.weight' has 8 NaN or infinite"):
        moekit.load(xverse)


def test_nan_in_a_matrix_quantised_as_read_is_named(xverse):
    """quantize= quantises each matrix as it is read: a NaN there is named with its count, as without it."""
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    rewrite(xverse, name, lambda t: t.index_fill(1, torch.tensor([5]), float("nan")))
    with pytest.raises(CheckpointError, match=rf"model-00002-of-00002\.safetensors: tensor '{re.escape(name)}' has "
                                              r"64 NaN or infinite value\(s\) of 2048"):
        moekit.load(xverse, quantize="int8")


def test_overflow_into_the_chosen_dtype_is_named(xverse):
    rewrite(xverse, "model.layers.1.mlp.router.weight", lambda t: t.index_fill(1, torch.tensor([0]), 1e6))
    moekit.load(xverse)  # bfloat16, as stored: fine
    with pytest.raises(CheckpointError, match=r"router\.weight' has 8 NaN or infinite value\(s\) of 512 after "
                                              r"conversion from bfloat16 to float16"):
        moekit.load(xverse, dtype="float16")


def test_integer_tensor_where_a_float_weight_belongs(xverse):
    rewrite(xverse, "model.layers.1.mlp.router.weight", lambda t: (t * 100).long())
    with pytest.raises(CheckpointError, match=r"tensors of the wrong type:\n  model-00002-of-00002\.safetensors: "
                                              r"tensor 'model\.layers\.1\.mlp\.router\.weight' holds I64 integers"):
        moekit.load(xverse)


def test_int_tensor_in_a_bin_shard(checkpoints, tmp_path):
    folder = tmp_path / "orion"
    shutil.copytree(checkpoints("orion")[0], folder)
    shard = folder / "pytorch_model-00001-of-00002.bin"
    state = torch.load(shard, weights_only=True)
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"].to(torch.int32)
    torch.save(state, shard)
    with pytest.raises(CheckpointError, match=r"'model\.embed_tokens\.weight' holds torch\.int32 integers"):
        moekit.load(folder)


def test_shapes_are_checked_against_the_headers_before_allocating(xverse, monkeypatch):
    rewrite(xverse, "model.layers.1.mlp.router.weight", lambda t: torch.zeros(7, 64))
    load = importlib.import_module("moekit.weights.load")  # the module (moekit.weights.load is the function)
    monkeypatch.setattr(load, "_allocate", lambda *a: pytest.fail("allocated before the shape check"))
    with pytest.raises(CheckpointError, match=r"router\.weight' has shape \[7, 64\], config\.json implies \[8, 64\]"):
        moekit.load(xverse)


def test_unreadable_config_json_is_named(xverse, capsys):
    (xverse / "config.json").unlink()
    os.symlink("config.json", xverse / "config.json")  # a symlink loop
    rc, err = cli(capsys, "generate", "--model", str(xverse), "--prompt", "x")
    one_line(rc, err, f"{xverse / 'config.json'}: cannot be read (Too many levels of symbolic links)")


def test_broken_generation_config_is_named(text_checkpoint, tmp_path, capsys):
    folder = tmp_path / "m"
    shutil.copytree(text_checkpoint("xverse"), folder)
    (folder / "generation_config.json").write_text('{"temperature": 0.7,')
    rc, err = cli(capsys, "generate", "--model", str(folder), "--prompt", "x")
    assert rc == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith(f"moekit generate: error: {folder / 'generation_config.json'}: "
                                                   f"not a readable JSON file"), err


def test_flags_are_checked_and_named(text_checkpoint, capsys):
    model = str(text_checkpoint("xverse"))
    for threads in ("-3", "0", "two"):
        rc, err = cli(capsys, "generate", "--model", model, "--prompt", "x", "--threads", threads)
        assert rc == 2 and f"argument --threads: {threads!r} is not a positive integer" in err, err
    rc, err = cli(capsys, "generate", "--model", model, "--prompt", "x", "--chat-format", "bogus")
    one_line(rc, err, "--chat-format 'bogus': not a chat format; choose one of xverse-moe")


def test_internal_bugs_keep_their_traceback(monkeypatch):
    import moekit.cli

    def broken(args):
        raise ValueError("an internal bug")

    monkeypatch.setattr(moekit.cli, "cmd_info", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        main(["info"])


def test_prompt_bytes_that_are_not_utf8_are_replaced_with_a_note(text_checkpoint):
    r = run("generate", "--model", str(text_checkpoint("xverse")), "--prompt", b"caf\xe9 \xff!", "--max-new-tokens",
            "4", "--temperature", "0")
    err = r.stderr.decode()
    assert r.returncode == 0 and "Traceback" not in err, err
    assert "--prompt: 2 byte(s) are not valid UTF-8; replaced with U+FFFD" in err


def test_chat_survives_bad_bytes_and_a_message_too_long(text_checkpoint):
    model = str(text_checkpoint("xverse"))
    long = " ".join(["word"] * 400)
    r = run("chat", "--model", model, "--max-new-tokens", "200", "--temperature", "0", "--ignore-eos",
            input=b"hi \xff there\n" + long.encode() + b"\nhello\n/exit\n")
    err = r.stderr.decode()
    assert r.returncode == 0 and "Traceback" not in err, err
    assert "your message: 1 byte(s) are not valid UTF-8" in err
    assert "error: the last message needs" in err and "(message dropped; the conversation goes on)" in err
    assert len([t for t in r.stdout.decode().split("> ") if t.strip()]) == 2  # both good turns answered


def test_chat_with_stdin_closed(text_checkpoint):
    r = subprocess.run(["sh", "-c", f'exec "{sys.executable}" -m moekit.cli chat --model '
                        f'"{text_checkpoint("xverse")}" 0<&-'], capture_output=True, text=True, timeout=120)
    one_line(r.returncode, r.stderr, "standard input, which is closed")


def test_ctrl_c_during_generation_exits_130_without_a_traceback():
    # a terminal delivers SIGINT; a shell's background job (e.g. CI started with &) inherits it ignored,
    # and Python then installs no KeyboardInterrupt handler: give the child the terminal's default
    proc = subprocess.Popen([sys.executable, "-m", "moekit.cli", "generate", "--prompt", "In the beginning",
                             "--stream", "--ignore-eos", "--max-new-tokens", "1000", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout.read(1)  # generating
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and b"Traceback" not in err, err.decode()


def test_plot_without_matplotlib_says_what_to_install(tmp_path):
    fake = tmp_path / "site" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    (tmp_path / "log.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])}
    r = run("plot", str(tmp_path / "log.jsonl"), "-o", str(tmp_path / "p.png"), env=env)
    one_line(r.returncode, r.stderr.decode(), "plotting needs matplotlib", "pip install 'moekit[plot]'")


def test_codec_errors_name_the_file(tmp_path):
    from moekit.tokenizer import Tokenizer, TokenizerError
    from tests.tokfixtures import write_hf_bpe

    write_hf_bpe(tmp_path)
    (tmp_path / "tokenizer_config.json").write_bytes(b'{"bos_token": "\xff"}')
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: not valid JSON \('utf-8' codec"):
        Tokenizer.from_pretrained(tmp_path)


def test_upcycle_errors_are_one_line(checkpoints, tmp_path, capsys):
    """moekit.upcycle's bad-input errors are MoekitErrors: one line, no traceback."""
    rc, err = cli(capsys, "upcycle", "--model", str(checkpoints("xverse")[0]), "--out", str(tmp_path / "o"),
                  "--method", "random", "--experts", "2", "--top-k", "1")
    one_line(rc, err, "already has experts")
