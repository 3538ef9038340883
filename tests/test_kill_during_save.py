"""SIGKILL at seeded moments of a save: the target holds the complete old state or the complete new one.

tests/save_worker.py forks a child per save; the test kills it after a delay drawn over the
save's measured duration (some late, to land after the commit point), then loads what is
there and compares every tensor with the two candidates. A last save must leave no temporaries.
"""

import json
import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

import moekit
from moekit.train import checkpoint
from tests.save_worker import HF_LAYERS, TINY_MODEL, hf_value, train_model, train_state

ROOT = Path(__file__).resolve().parents[1]
TRIALS = 10
MIN_KILLS = 3  # saves really cut short (the rest finished first: timing on a shared machine varies)


class Worker:
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "save_worker.py")], cwd=ROOT, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdout.readline().strip() == "ready"

    def start(self, **cmd) -> int:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        word, pid = self.proc.stdout.readline().split()
        assert word == "start"
        return int(pid)

    def wait(self) -> tuple[bool, float]:
        """(killed by SIGKILL, seconds) of the last save."""
        word, status, seconds = self.proc.stdout.readline().split()
        assert word == "exit"
        status = int(status)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        assert killed or os.WEXITSTATUS(status) == 0, "the save failed (traceback above)"
        return killed, float(seconds)

    def run(self, delay: float | None = None, **cmd) -> tuple[bool, float]:
        pid = self.start(**cmd)
        if delay is not None:
            time.sleep(delay)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # already done
                pass
        return self.wait()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.close()


def delays(seconds: float, seed: int) -> list[float]:
    """Seven spread over the whole save, three over its last 40% (the commit point is near the end)."""
    rng = random.Random(seed)
    return [rng.uniform(0.6 * seconds, seconds) if i % 3 == 2 else rng.uniform(0, seconds) for i in range(TRIALS)]


def typical(durations) -> float:
    return sorted(durations)[len(durations) // 2]


def hf_variant(folder: Path) -> int:
    """Which variant ``folder`` holds, asserting it holds all of it."""
    model = moekit.load(folder, kernels="reference")
    variant = HF_LAYERS.index(model.config.num_layers)
    for name, t in model.named_views().items():
        assert bool((t == hf_value(variant)).all()), f"{name}: not variant {variant}'s value: a mix"
    return variant


def user_files(folder: Path) -> dict:
    (folder / "data").mkdir()
    (folder / "data" / "corpus.txt").write_text("mine")
    (folder / "notes.md").write_text("notes")
    (folder / "link").symlink_to("notes.md")
    os.mkfifo(folder / "pipe")
    return snapshot(folder)


def snapshot(folder: Path) -> dict:
    return {"data": (folder / "data" / "corpus.txt").read_text(), "notes": (folder / "notes.md").read_text(),
            "link": os.readlink(folder / "link"), "fifo": stat.S_ISFIFO((folder / "pipe").lstat().st_mode),
            "mode": stat.S_IMODE(folder.stat().st_mode)}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".moekit"))


@pytest.mark.slow
def test_killed_hf_save_leaves_old_or_new(worker, tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    mine = user_files(target)
    seconds = typical([worker.run(kind="hf", target=str(target), variant=v)[1] for v in (0, 1, 0)])
    assert hf_variant(target) == 0
    state, kills, outcomes = 0, 0, []
    for delay in delays(seconds, seed=14):
        killed, _ = worker.run(delay, kind="hf", target=str(target), variant=1 - state)
        got = hf_variant(target)
        assert got in (state, 1 - state)
        kills += killed
        outcomes.append((round(delay / seconds, 2), killed, got != state))
        state = got
    assert kills >= MIN_KILLS, (seconds, outcomes)
    worker.run(kind="hf", target=str(target), variant=1 - state)
    assert hf_variant(target) == 1 - state
    assert leftovers(target) == [] and snapshot(target) == mine
    names = {p.name for p in target.iterdir()} - {"data", "notes.md", "link", "pipe"}
    index = json.loads((target / "model.safetensors.index.json").read_text())
    assert names == {"config.json", "model.safetensors.index.json", *index["weight_map"].values()}


def train_step_of(path: Path) -> int:
    """The step whose values the checkpoint ``path`` holds, asserting it is complete and unmixed."""
    step = json.loads((path / "trainer.json").read_text())["step"]
    model, opt = train_model()
    checkpoint.load(path, model, opt)
    for p in model.parameters():
        assert bool((p == step / 8).all()) and bool((opt.state[p]["exp_avg"] == step).all()), path
        assert bool((opt.state[p]["exp_avg_sq"] == 2 * step).all()), path
    return step


@pytest.mark.slow
def test_killed_training_checkpoint_leaves_old_or_new(worker, tmp_path):
    root = tmp_path / "run" / "checkpoints"
    seconds = typical([worker.run(kind="train", root=str(root), step=step)[1] for step in (1, 2, 3)])
    assert train_step_of(checkpoint.latest(root)) == 3
    last, kills, outcomes = 3, 0, []
    for i, delay in enumerate(delays(seconds, seed=15)):
        step = i + 4
        killed, _ = worker.run(delay, kind="train", root=str(root), step=step)
        kills += killed
        got = train_step_of(checkpoint.latest(root))
        assert got in (last, step)
        outcomes.append((round(delay / seconds, 2), killed, got == step))
        for p in root.iterdir():  # a step folder is always a complete checkpoint
            assert not p.name.startswith("step-") or (p / "trainer.json").exists(), p
        last = got
    assert kills >= MIN_KILLS, (seconds, outcomes)
    worker.run(kind="train", root=str(root), step=TRIALS + 4)
    assert train_step_of(checkpoint.latest(root)) == TRIALS + 4
    assert leftovers(root) == [] and len(list(root.iterdir())) == 2  # keep=2, nothing else


def test_a_step_saved_again_is_never_missing(tmp_path):
    """Saving a step that exists moves the old one aside first; killed before the new one is in,
    the aside copy is what latest() finds, and the next save puts it back."""
    root = tmp_path / "checkpoints"
    model, opt = train_model(TINY_MODEL)
    train_state(model, opt, 3)
    checkpoint.save(root, 3, model, opt, {})
    train_state(model, opt, 5)
    checkpoint.save(root, 3, model, opt, {})
    os.replace(root / "step-00000003", root / ".moekit-tmp-old-step-00000003")  # killed between the renames
    found = checkpoint.latest(root)
    assert found.name == ".moekit-tmp-old-step-00000003"
    fresh, fresh_opt = train_model(TINY_MODEL)
    assert checkpoint.load(found, fresh, fresh_opt)["step"] == 3
    assert all(bool((p == 5 / 8).all()) for p in fresh.parameters())
    checkpoint.save(root, 4, model, opt, {})
    assert sorted(p.name for p in root.iterdir()) == ["step-00000003", "step-00000004"]
