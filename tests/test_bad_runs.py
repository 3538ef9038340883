"""Bad training runs: run files, --set values, data files, a busy out_dir, --resume with nothing to resume.
Each is one line naming the file, field or flag (exit 2), or a warning naming the file; never a traceback."""

import json
import logging
import os
import subprocess
import sys

import pytest

from moekit.cli import main
from moekit.config import ConfigError
from moekit.train import load_config
from moekit.train.data import Source, documents
from moekit.train.trainer import _lock
from tests.test_train_loop import MODEL
from tests.tokfixtures import write_training_folder


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_training_folder(tmp_path_factory.mktemp("badruns"), 60)


def run_file(root, name, extra="", data="text.txt", seq_len=32):
    """A tiny run file written as YAML text (so `1e-3` stays what a user types)."""
    model = "{" + ", ".join(f"{k}: {v}" for k, v in MODEL.items() if not isinstance(v, list)) + \
        ", architectures: [XverseForCausalLM]}"
    path = root / f"{name}.yaml"
    path.write_text(f"""tokenizer: tok
out_dir: out-{name}
steps: 2
batch_size: 2
precision: fp32
eval_every: 0
export: false
model: {{config: {model}}}
data:
  seq_len: {seq_len}
  cache_dir: cache
  sources: [{{name: text, paths: [{data}], separator: "\\n\\n", heldout: 0.1}}]
{extra}""")
    return path


def train_cli(capsys, path, *extra):
    try:
        rc = main(["train", str(path), *extra])
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


def one_line(rc, err, *names):
    """Exit 2, no traceback, and the last line (progress bars may come before it) is the error naming ``names``."""
    last = err.strip().splitlines()[-1] if err.strip() else ""
    assert rc == 2 and "Traceback" not in err and last.startswith("moekit train: error: "), err
    for name in names:
        assert name in last, (name, err)


def test_numbers_are_read_by_the_fields_type(root):
    path = run_file(root, "types", "optim: {lr: 1e-3, min_lr: 1e-4, warmup: 1e0}\nseed: '7'\n")
    cfg = load_config(path, {"optim": {"lr": "2e-3"}, "steps": "3"})
    assert cfg.optim.lr == 2e-3 and cfg.optim.min_lr == 1e-4 and cfg.optim.warmup == 1 and cfg.steps == 3
    assert cfg.seed == 7 and isinstance(cfg.optim.warmup, int) and isinstance(cfg.optim.lr, float)


@pytest.mark.parametrize("extra, sets, names", [
    ("", ["steps=abc"], ["--set steps='abc': must be an integer"]),
    ("", ["optim.lr=fast"], ["--set optim.lr='fast': must be a number"]),
    ("", ["optim.lrr=1"], ["--set optim: unknown field(s) ['lrr']"]),
    ("optim: {lr: 1e-x}\n", [], ["types-bad.yaml: optim.lr='1e-x': must be a number"]),
    ("", ["data.seq_len=0"], ["--set data.seq_len=0 must be >= 1"]),
    ("", ["log_every=0"], ["--set log_every=0 must be >= 1"]),
    ("", ["data.chat_format=bogus"], ["data.chat_format='bogus' is not a chat format"]),
    ("", ["model.overrides.moe.aux_loss_coef=lots"], ["--set model.overrides.moe.aux_loss_coef='lots': must be a "
                                                      "number"]),
    ("", ["model.config.vocab_size=1000000000000"], ["model.config: vocab_size=1000000000000, hidden_size=48, "
                                                     "num_layers=2 make 96,0", "GiB in float32; this machine has"]),
])
def test_bad_values_name_the_field_and_where_it_came_from(root, capsys, extra, sets, names):
    path = run_file(root, "types-bad", extra)
    rc, err = train_cli(capsys, path, *[a for s in sets for a in ("--set", s)])
    one_line(rc, err, *names)


@pytest.mark.parametrize("text, names", [
    ("steps: [1\n", ["not valid YAML at line 2"]),
    ("just a string\n", ["a run file is a mapping of fields", "not a str"]),
    ("include: nobase.yaml\nsteps: 3\n", ["include 'nobase.yaml': no such file"]),
    ("tokenizer: tok\n", ["missing field(s) ['model', 'data']"]),
    ("\xff\n", ["not UTF-8 text"]),
])
def test_broken_run_files_are_one_line(root, capsys, text, names):
    path = root / "broken.yaml"
    path.write_bytes(text.encode("latin-1"))
    rc, err = train_cli(capsys, path)
    one_line(rc, err, str(path), *names)


def test_include_values_are_blamed_on_the_include(root, capsys):
    (root / "base.yaml").write_text("steps: many\n")
    path = run_file(root, "inc", "include: base.yaml\n").read_text().replace("steps: 2\n", "")
    (root / "inc.yaml").write_text(path)
    rc, err = train_cli(capsys, root / "inc.yaml")
    one_line(rc, err, f"{root / 'base.yaml'}: steps='many': must be an integer")


def test_seq_len_beyond_the_models_context(root, capsys):
    rc, err = train_cli(capsys, run_file(root, "long", seq_len=200))
    one_line(rc, err, "data.seq_len=200 is longer than the model's context (max_position_embeddings=128)")


def test_missing_binary_and_invalid_utf8_data(root, capsys, caplog):
    rc, err = train_cli(capsys, run_file(root, "missing", data="nope.txt"))
    one_line(rc, err, "data source 'text': no such file(s)", "nope.txt")
    (root / "blob.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 10)
    rc, err = train_cli(capsys, run_file(root, "blob", data="blob.txt"))
    one_line(rc, err, f"{root / 'blob.txt'}: looks like a binary file (NUL bytes)")
    (root / "latin1.txt").write_bytes("caf\xe9 au lait, d\xe9j\xe0 vu\n\n".encode("latin-1") * 3)
    with caplog.at_level(logging.WARNING, logger="moekit"):
        docs = list(documents(Source("l1", [str(root / "latin1.txt")], separator="\n\n")))
    assert docs == ["caf\ufffd au lait, d\ufffdj\ufffd vu"] * 3
    assert f"{root / 'latin1.txt'}: 9 byte(s) are not valid UTF-8 (the first at byte 3)" in caplog.text


def test_a_busy_out_dir_is_refused_naming_the_holder_and_resume_skips_a_cut_line(root):
    path = run_file(root, "busy")
    lock = _lock(root / "out-busy")  # this process plays the running training
    try:
        r = subprocess.run([sys.executable, "-m", "moekit.cli", "train", str(path)], capture_output=True, text=True,
                           timeout=300)
        one_line(r.returncode, r.stderr, f"out_dir {root / 'out-busy'} is in use by another training "
                                         f"(pid {os.getpid()} on ", "wait for it to finish or choose another out_dir")
        assert not (root / "out-busy" / "log.jsonl").exists()
    finally:
        lock.close()
    r = subprocess.run([sys.executable, "-m", "moekit.cli", "train", str(path)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert (root / "out-busy" / "train.lock").read_text() == ""  # released
    log = root / "out-busy" / "log.jsonl"
    log.write_text(log.read_text() + '{"step": 3, "lo')  # a line a kill cut short
    r = subprocess.run([sys.executable, "-m", "moekit.cli", "train", str(path), "--resume", "--set", "steps=3"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert [json.loads(ln)["step"] for ln in log.read_text().splitlines()] == [0, 1, 2, 3]


def test_resume_without_a_checkpoint_is_refused(root, capsys):
    rc, err = train_cli(capsys, run_file(root, "fresh"), "--resume")
    one_line(rc, err, f"--resume: no checkpoint under {root / 'out-fresh' / 'checkpoints'}",
             "leave out --resume to start from step 0")
    with pytest.raises(ConfigError, match="data.seq_len=0"):
        load_config(run_file(root, "zero", seq_len=0))


def test_upcycle_options_are_read_by_type(root):
    path = root / "up.yaml"
    path.write_text("tokenizer: tok\nmodel: {upcycle: {path: dense, method: copy, experts: 4, top_k: 1, noise: 1e-3, "
                    "seq_len: '64'}}\ndata: {sources: [{name: t, paths: [text.txt]}]}\n")
    up = load_config(path).model.upcycle
    assert up["noise"] == 1e-3 and up["seq_len"] == 64 and up["path"] == str(root / "dense")
    with pytest.raises(ConfigError, match=r"^--set model\.upcycle\.experts='many': must be an integer$"):
        load_config(path, {"model": {"upcycle": {"experts": "many"}}})
