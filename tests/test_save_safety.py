"""Saving into a folder writes the checkpoint's own files and nothing else; bad targets are refused.

Covers moekit.save, the trainer's export and upcycle's --out (docs/guarantees.md).
"""

import importlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import moekit
from moekit import CheckpointError
from moekit.weights import io

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def same_weights(a, b) -> bool:
    va, vb = a.named_views(), b.named_views()
    return va.keys() == vb.keys() and all(torch.equal(va[k], vb[k]) for k in va)


def populate(folder: Path) -> dict:
    """A user's things in ``folder``; returns what must survive a save."""
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "train.txt").write_text("my data")
    (folder / "src").mkdir()
    (folder / "notes.md").write_text("notes")
    (folder / "link").symlink_to("notes.md")
    os.mkfifo(folder / "pipe")
    (folder / "adapter_model.safetensors").write_bytes(b"not ours")
    (folder / "training_args.bin").write_bytes(b"not ours either")
    folder.chmod(0o751)
    return state(folder)


def state(folder: Path) -> dict:
    return {"data": (folder / "data" / "train.txt").read_text(), "src": (folder / "src").is_dir(),
            "notes": (folder / "notes.md").read_text(), "link": os.readlink(folder / "link"),
            "fifo": stat.S_ISFIFO((folder / "pipe").lstat().st_mode),
            "adapter": (folder / "adapter_model.safetensors").read_bytes(),
            "args": (folder / "training_args.bin").read_bytes(), "mode": stat.S_IMODE(folder.stat().st_mode)}


def test_save_keeps_everything_that_is_not_the_checkpoint(checkpoints, tmp_path, umask022):
    old, new = moekit.load(checkpoints("mixtral")[0]), moekit.load(checkpoints("xverse")[0])
    target = tmp_path / "ckpt"
    mine = populate(target)
    moekit.save(old, target, max_shard_bytes=20_000)  # several shards
    old_shards = set(json.loads((target / io.SAFE_INDEX).read_text())["weight_map"].values())
    assert len(old_shards) > 1
    (target / "model-00007-of-00009.safetensors").write_text("a shard of something older")
    (target / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"a": "pytorch_model.bin"}}))
    (target / "pytorch_model.bin").write_bytes(b"old")
    moekit.save(new, target)
    assert state(target) == mine
    names = {p.name for p in target.iterdir()}
    assert names == {"data", "src", "notes.md", "link", "pipe", "adapter_model.safetensors", "training_args.bin",
                     "config.json", io.SAFE_INDEX, "model-00001-of-00001.safetensors"}
    for name in ("config.json", io.SAFE_INDEX, "model-00001-of-00001.safetensors"):
        assert stat.S_IMODE((target / name).stat().st_mode) == 0o644, name
    assert same_weights(moekit.load(target), new)


def test_new_folders_get_normal_permissions(checkpoints, tmp_path, umask022):
    model = moekit.load(checkpoints("xverse")[0])
    out = moekit.save(model, tmp_path / "a" / "b")
    assert stat.S_IMODE(out.stat().st_mode) == 0o755 and stat.S_IMODE(out.parent.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}
    io.atomic_write_text(tmp_path / "report.json", "{}")  # the report / data-cache writer
    assert stat.S_IMODE((tmp_path / "report.json").stat().st_mode) == 0o644


def test_next_save_removes_what_killed_saves_left(checkpoints, tmp_path):
    model = moekit.load(checkpoints("xverse")[0])
    target = tmp_path / "ckpt"
    moekit.save(model, target)
    (target / ".moekit-tmp-0badf00d-model-00001-of-00001.safetensors").write_bytes(b"x" * 1000)
    (target / ".moekit-tmp-0badf00d-config.json").write_text("{}")
    legacy = tmp_path / ".ckpt.tmp-ab_cd123"  # what moekit 0.1.0 left beside the target
    legacy.mkdir()
    (legacy / "model-00001-of-00001.safetensors").write_bytes(b"x" * 1000)
    unrelated = tmp_path / ".other.tmp-ab_cd123"
    unrelated.mkdir()
    moekit.save(model, target)
    assert not [p for p in target.iterdir() if p.name.startswith(".")]
    assert not legacy.exists() and unrelated.exists()


def test_kill_after_the_commit_point_reads_new_and_next_save_finishes(checkpoints, tmp_path, monkeypatch):
    """Killed half-way through the renames: moekit.load already reads the new checkpoint (the journal
    names the rest), and the next save completes the renames before writing its own."""
    old, new = moekit.load(checkpoints("mixtral")[0]), moekit.load(checkpoints("xverse")[0])
    target = tmp_path / "ckpt"
    moekit.save(old, target)
    real = io.finish_interrupted

    def killed_half_way(folder):
        journal = json.loads((folder / io.JOURNAL).read_text())
        shard = next(n for n in journal["files"] if n.endswith(".safetensors"))
        os.replace(folder / journal["files"][shard], folder / shard)
        raise KeyboardInterrupt

    monkeypatch.setattr(io, "finish_interrupted", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        moekit.save(new, target)
    monkeypatch.setattr(io, "finish_interrupted", real)
    assert (target / io.JOURNAL).exists()
    assert json.loads((target / "config.json").read_text())["model_type"] == "mixtral"  # not renamed yet
    assert same_weights(moekit.load(target), new)
    real(target)  # what the next save does first
    assert not [p for p in target.iterdir() if p.name.startswith(".")]
    assert same_weights(moekit.load(target), new)


def test_failed_save_before_the_commit_point_changes_nothing(checkpoints, tmp_path, monkeypatch):
    old, new = moekit.load(checkpoints("mixtral")[0]), moekit.load(checkpoints("xverse")[0])
    target = tmp_path / "ckpt"
    moekit.save(old, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def disk_full(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(importlib.import_module("moekit.weights.io"), "atomic_write_text", disk_full)
    with pytest.raises(OSError, match="disk full"):
        moekit.save(new, target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before


def test_bad_targets_are_refused(checkpoints, tmp_path, monkeypatch):
    model = moekit.load(checkpoints("xverse")[0])
    file = tmp_path / "model.txt"
    file.write_text("keep")
    with pytest.raises(CheckpointError, match=rf"{file}: exists and is not a folder"):
        moekit.save(model, file)
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.json").write_text('{"mine": true}')
    with pytest.raises(CheckpointError, match=rf"{project / 'config.json'}: exists in a folder that holds no "
                                              "checkpoint"):
        moekit.save(model, project)
    assert file.read_text() == "keep" and (project / "config.json").read_text() == '{"mine": true}'
    assert sorted(p.name for p in project.iterdir()) == ["config.json"]


def test_save_into_the_current_folder(checkpoints, tmp_path, monkeypatch):
    """``--out .``: a folder with other things and no config.json gets the checkpoint added, nothing removed."""
    model = moekit.load(checkpoints("xverse")[0])
    mine = populate(tmp_path / "work")
    monkeypatch.chdir(tmp_path / "work")
    moekit.save(model, ".")
    assert state(tmp_path / "work") == mine and same_weights(moekit.load("."), model)


def test_export_writes_tokenizer_files_with_the_weights(checkpoints, tmp_path):
    from moekit.train.export import export_model

    model = moekit.load(checkpoints("xverse")[0], dtype=torch.float32)
    tok = tmp_path / "tok"
    tok.mkdir()
    target = tmp_path / "run" / "model"
    mine = populate(target)
    for version in (1, 2):  # an earlier export, then this one
        (tok / "tokenizer.json").write_text(f'{{"v": {version}}}')
        export_model(model, None, SimpleNamespace(precision="fp32", tokenizer=str(tok)), target)
    assert state(target) == mine and (target / "tokenizer.json").read_text() == '{"v": 2}'
    assert same_weights(moekit.load(target), model)


def test_upcycle_refuses_its_own_input_and_a_file(checkpoints, tmp_path):
    from moekit.upcycle import upcycle_checkpoint

    dense = checkpoints("llama")[0]
    before = sorted(p.name for p in dense.iterdir())
    with pytest.raises(CheckpointError, match="is the dense checkpoint being upcycled"):
        upcycle_checkpoint(dense, dense, method="random", experts=2, top_k=1, progress=False)
    assert sorted(p.name for p in dense.iterdir()) == before
    file = tmp_path / "out"
    file.write_text("x")
    proc = subprocess.run([sys.executable, "-m", "moekit.cli", "upcycle", "--model", str(dense), "--out", str(file),
                           "--method", "random", "--experts", "2", "--top-k", "1"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"moekit upcycle: error: {file}: exists and is not a folder; give a folder to write the checkpoint into"]


def test_upcycle_into_a_folder_keeps_other_files(checkpoints, tmp_path):
    from moekit.upcycle import upcycle_checkpoint

    out = tmp_path / "moe"
    mine = populate(out)
    rep = upcycle_checkpoint(checkpoints("llama")[0], out, method="random", experts=2, top_k=1, progress=False)
    assert state(out) == mine and rep["output"] == str(out)
    assert moekit.load(out).config.moe.num_experts == 2


def test_chat_templates_run_sandboxed():
    from moekit.chat import ChatError, ChatFormat

    escape = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ChatError, match="chat template"):
        ChatFormat(escape).render([{"role": "user", "content": "hi"}])
