"""Resuming never runs code from a checkpoint: a planted pickle in any of its files is refused, named.

Each planted object would create a marker file when unpickled; the marker must never appear.
"""

import dataclasses
import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

from moekit import CheckpointError
from moekit.train import checkpoint, load_config, safe_dcp, train
from tests.save_worker import TINY_MODEL, train_model, train_state
from tests.test_train_loop import run_file
from tests.tokfixtures import TEXT, write_hf_bpe

ROOT = Path(__file__).resolve().parents[1]
TINY = TINY_MODEL


class Evil:
    marker: Path

    def __reduce__(self):
        return (os.system, (f"touch {Evil.marker}",))


@pytest.fixture
def saved(tmp_path):
    Evil.marker = tmp_path / "pwned"
    model, opt = train_model(TINY)
    train_state(model, opt, 3)
    return checkpoint.save(tmp_path / "checkpoints", 3, model, opt, {"mixture": {"text": 1}})


def resume(path):
    model, opt = train_model(TINY)
    return checkpoint.load(path, model, opt), model, opt


def refused(path, match):
    with pytest.raises(CheckpointError, match=match) as e:
        resume(path)
    assert "\n" not in str(e.value) and not Evil.marker.exists()


def test_resume_restores_model_optimizer_and_state(saved):
    state, model, opt = resume(saved)
    assert state["step"] == 3 and state["mixture"] == {"text": 1}
    for p in model.parameters():
        assert bool((p == 3 / 8).all()) and bool((opt.state[p]["exp_avg"] == 3).all())
    assert opt.param_groups[0]["lr"] == 1e-3 and opt.param_groups[0]["betas"] == (0.9, 0.999)


def test_metadata_needs_only_the_allowed_globals(saved):
    """The classes a real .metadata (model + AdamW) references: all in the restricted unpickler's list."""
    seen = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            seen.add((module, name))
            return super().find_class(module, name)

    with open(saved / ".metadata", "rb") as f:
        Recorder(f).load()  # our own freshly written file
    torch_values = {n for m, n in seen if m == "torch" and n != "Size"}
    assert seen - {("torch", n) for n in torch_values} <= safe_dcp.METADATA_CLASSES, seen
    assert all(isinstance(getattr(torch, n), (torch.dtype, torch.layout, torch.memory_format)) for n in torch_values)


def test_planted_metadata_is_refused(saved):
    (saved / ".metadata").write_bytes(pickle.dumps(Evil()))
    refused(saved, r"\.metadata: refused to unpickle: .*posix\.system is not part of checkpoint metadata")


def test_metadata_hiding_code_in_a_field_is_refused(saved):
    md = safe_dcp.read_metadata(saved / ".metadata")
    md.version = Evil()
    (saved / ".metadata").write_bytes(pickle.dumps(md))
    refused(saved, r"\.metadata: refused to unpickle")


def plant(folder: Path, kind) -> str:
    """Point one stored value of type ``kind`` at a pickled Evil appended to its shard file."""
    md = safe_dcp.read_metadata(folder / ".metadata")
    fqn = next(k for k, v in md.state_dict_metadata.items() if isinstance(v, kind))
    index = next(i for i in md.storage_data if i.fqn == fqn)
    info = md.storage_data[index]
    buf = io.BytesIO()
    torch.save(Evil(), buf)
    shard = folder / info.relative_path
    offset = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(buf.getvalue())
    md.storage_data[index] = dataclasses.replace(info, offset=offset, length=len(buf.getvalue()))
    (folder / ".metadata").write_bytes(pickle.dumps(md))
    return info.relative_path


@pytest.mark.parametrize("kind", [BytesStorageMetadata, TensorStorageMetadata], ids=["value", "tensor"])
def test_planted_pickle_in_a_shard_is_refused(saved, kind):
    """Non-tensor values (optimizer hyper-parameters) are read by DCP with weights_only=False: not here."""
    shard = plant(saved, kind)
    refused(saved, rf"{shard}: refused to unpickle: .*system")


def test_planted_rng_state_is_refused(saved):
    torch.save({"torch": Evil()}, saved / "rng-0.pt")
    refused(saved, r"rng-0\.pt: refused to unpickle")


def test_trainer_state_must_be_json(saved):
    (saved / "trainer.json").write_bytes(pickle.dumps(Evil()))
    refused(saved, r"trainer\.json: not valid JSON")


def test_shard_outside_the_folder_is_refused(saved):
    md = safe_dcp.read_metadata(saved / ".metadata")
    index = next(iter(md.storage_data))
    md.storage_data[index] = dataclasses.replace(md.storage_data[index], relative_path="../../etc/passwd")
    (saved / ".metadata").write_bytes(pickle.dumps(md))
    refused(saved, r"\.metadata: names a shard file outside its folder \('\.\./\.\./etc/passwd'\)")


def test_cli_resume_refuses_a_planted_metadata_in_one_line(tmp_path):
    write_hf_bpe(tmp_path / "tok")
    (tmp_path / "text.txt").write_text("\n\n".join(f"{TEXT[i % len(TEXT)]} ({i})" for i in range(100)))
    path = run_file(tmp_path, "run", steps=2, save_every=2, eval_every=0, export=False)
    train(load_config(path))
    last = checkpoint.latest(tmp_path / "run" / "checkpoints")
    Evil.marker = tmp_path / "pwned"
    (last / ".metadata").write_bytes(pickle.dumps(Evil()))
    proc = subprocess.run([sys.executable, "-m", "moekit.cli", "train", str(path), "--resume"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("moekit train: error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"{last / '.metadata'}: refused to unpickle" in errors[0]
    assert errors[0] == proc.stderr.strip().splitlines()[-1]
    assert not Evil.marker.exists()
