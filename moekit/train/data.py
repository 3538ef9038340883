"""Training data: token shards on disk, fixed-length windows, and a deterministic, resumable mixture.

- ``build_shard`` tokenises a source (text files, JSONL ``text``, or JSONL chat ``messages``)
  into a flat memory-mapped token file per split, documents separated by EOS; a
  deterministic fraction of documents goes to the held-out split (``is_heldout``, the one
  rule that recipes splitting their own text use too). Files are written to a
  temporary name and renamed, and reused when their inputs have not changed.
- ``TokenStream`` serves windows of seq_len + 1 tokens in a seeded order per epoch.
- ``Mixture`` picks each batch row's source with fixed weights (LLaMA-MoE's static
  sampling) or weights updated from per-domain loss (Sheared-LLaMA dynamic batch
  loading). The batch at step s depends only on (seed, s, cursors): resuming is exact.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from moekit.errors import MoekitError
from moekit.weights.io import atomic_write

log = logging.getLogger(__name__)
FORMATS = ("text", "jsonl", "chat")


@dataclass
class Source:
    """One data source of a mixture."""

    name: str  # domain name (logs, dynamic weights)
    paths: list[str]  # files or glob patterns
    weight: float = 1.0  # sampling weight (normalised over sources)
    format: str = "text"  # text | jsonl (a "text" field per line) | chat (a "messages" list per line)
    separator: str | None = None  # split text files into documents on this string (None: one per file)
    heldout: float = 0.01  # fraction of documents kept for evaluation
    reference_loss: float | None = None  # target loss of this domain (dynamic mixing)
    extra: dict = field(default_factory=dict)

    def files(self) -> list[Path]:
        out = []
        for p in self.paths:
            matches = sorted(glob.glob(os.path.expanduser(p))) if any(c in p for c in "*?[") else [p]
            out += [Path(m) for m in matches]
        missing = [str(f) for f in out if not f.is_file()]
        if not out or missing:
            raise MoekitError(f"data source {self.name!r}: no such file(s): {missing or self.paths}")
        return out


def read_text(path: Path) -> str:
    """A UTF-8 text file. Binary files (NUL bytes) are refused; invalid bytes become U+FFFD with a
    warning naming the file and how many bytes were replaced."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise MoekitError(f"{path}: cannot be read ({e.strerror or e})") from None
    if b"\x00" in raw[:1 << 16]:
        raise MoekitError(f"{path}: looks like a binary file (NUL bytes), not UTF-8 text; remove it from the "
                          f"data sources")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = len(raw) - len(raw.decode("utf-8", errors="ignore").encode("utf-8"))
        log.warning("%s: %d byte(s) are not valid UTF-8 (the first at byte %d); training on them as U+FFFD",
                    path, bad, e.start)
        return raw.decode("utf-8", errors="replace")


def documents(source: Source):
    """The source's documents in a fixed order: str for text, list of messages for chat."""
    for path in source.files():
        text = read_text(path)
        if source.format == "text":
            parts = text.split(source.separator) if source.separator else [text]
            yield from (p.strip() for p in parts if p.strip())
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise MoekitError(f"{path}:{n}: not valid JSON ({e})") from None
            key = "messages" if source.format == "chat" else "text"
            if not isinstance(row, dict) or key not in row:
                raise MoekitError(f"{path}:{n}: missing field {key!r}")
            yield row[key]


def is_heldout(index: int, fraction: float) -> bool:
    """The held-out rule: document ``index`` (0-based, in :func:`documents` order) is held out when it is
    every round(1 / fraction)-th one (indices every-1, 2*every-1, ...); fraction 0 holds out nothing."""
    every = max(1, round(1 / fraction)) if fraction > 0 else 0
    return bool(every) and index % every == every - 1


def _fingerprint(source: Source, tokenizer_key: str) -> str:
    h = hashlib.sha256(json.dumps([source.format, source.separator, source.heldout, tokenizer_key]).encode())
    for f in source.files():
        st = f.stat()
        h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _write_array(path: Path, arr: np.ndarray) -> None:
    atomic_write(path, arr.tofile, binary=True)


def build_shard(source: Source, encode, eos_id: int, vocab_size: int, cache_dir: str | Path,
                tokenizer_key: str = "", progress: bool = True) -> dict[str, Path]:
    """Tokenise ``source`` into ``{"train": path, "heldout": path}`` token files (reused if up to date).

    ``encode(doc) -> (ids, mask or None)`` turns one document into token ids; pretraining
    documents end with EOS. Chat sources also get a ``.mask`` file (1 = trained token).
    """
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    stem = cache / f"{source.name}-{_fingerprint(source, tokenizer_key)}"
    paths = {split: stem.with_suffix(f".{split}.tokens") for split in ("train", "heldout")}
    meta_path = stem.with_suffix(".json")
    if meta_path.exists() and all(p.exists() for p in paths.values()):
        return paths
    dtype = np.uint16 if vocab_size <= 65535 else np.uint32
    toks = {"train": [], "heldout": []}
    masks = {"train": [], "heldout": []}
    n_docs = 0
    for i, doc in enumerate(tqdm(documents(source), desc=f"tokenising {source.name}", unit="doc",
                                 disable=not progress)):
        ids, mask = encode(doc)
        split = "heldout" if is_heldout(i, source.heldout) else "train"
        toks[split].append(np.asarray(ids, dtype=dtype))
        if mask is not None:
            masks[split].append(np.asarray(mask, dtype=np.uint8))
        n_docs += 1
    if not toks["train"]:
        raise MoekitError(f"data source {source.name!r}: no training documents")
    meta = {"source": source.name, "documents": n_docs, "dtype": np.dtype(dtype).name}
    for split, parts in toks.items():
        arr = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
        _write_array(paths[split], arr)
        if masks[split]:
            _write_array(paths[split].with_suffix(".mask"), np.concatenate(masks[split]))
        meta[f"{split}_tokens"] = int(arr.size)
    meta_path.write_text(json.dumps(meta))  # last: marks the shard complete
    return paths


class TokenStream:
    """Windows of ``seq_len + 1`` tokens (and loss masks) over a token file, in a seeded order per epoch."""

    def __init__(self, path: Path, seq_len: int, seed: int = 0):
        meta = json.loads(Path(str(path).rsplit(".", 2)[0] + ".json").read_text())
        self.tokens = np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r")
        mask_path = path.with_suffix(".mask")
        self.mask = np.memmap(mask_path, dtype=np.uint8, mode="r") if mask_path.exists() else None
        self.seq_len, self.seed = seq_len, seed
        self.windows = (len(self.tokens) - 1) // seq_len
        if self.windows < 1:
            raise MoekitError(f"{path}: {len(self.tokens)} tokens cannot fill one window of {seq_len + 1}")
        self._epoch, self._order = -1, None

    def window(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The i-th window served (an infinite stream: each epoch is a fresh seeded permutation)."""
        epoch, j = divmod(i, self.windows)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.windows)
        start = int(self._order[j]) * self.seq_len
        sl = slice(start, start + self.seq_len + 1)
        return self.tokens[sl].astype(np.int64), None if self.mask is None else self.mask[sl].astype(bool)


class Mixture:
    """Batches drawn from several streams by weight; fully determined by (seed, step, cursors, weights)."""

    def __init__(self, names: list[str], streams: list[TokenStream], weights: list[float], seed: int = 0,
                 dynamic: dict | None = None, reference: dict[str, float] | None = None):
        self.names, self.streams, self.seed = names, streams, seed
        total = sum(weights)
        if total <= 0 or any(w < 0 for w in weights):
            raise MoekitError(f"data mixture weights {weights} must be >= 0 with a positive sum")
        self.weights = [w / total for w in weights]
        self.cursors = [0] * len(streams)
        self.step = 0
        self.dynamic, self.reference = dynamic, reference or {}

    def next_batch(self, batch: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """(tokens [B, L + 1], loss mask [B, L + 1] or None, source index [B]) of the next global batch."""
        rng = np.random.default_rng([self.seed, self.step])
        choice = rng.choice(len(self.streams), size=batch, p=self.weights)
        rows, masks = [], []
        for c in choice:
            toks, mask = self.streams[c].window(self.cursors[c])
            self.cursors[c] += 1
            rows.append(toks)
            masks.append(mask)
        self.step += 1
        mask = None if all(m is None for m in masks) else np.stack(
            [m if m is not None else np.ones_like(r, dtype=bool) for r, m in zip(rows, masks)])
        return np.stack(rows), mask, choice

    def update_weights(self, domain_loss: dict[str, float]) -> None:
        """Sheared-LLaMA dynamic batch loading: w <- softmax(log w + eta (L - L_ref)), smoothed by c."""
        if not self.dynamic:
            return
        eta, c = self.dynamic.get("eta", 1.0), self.dynamic.get("smoothing", 1e-4)
        logits = [math.log(max(w, 1e-12)) + eta * max(0.0, domain_loss[n] - self.reference.get(n, domain_loss[n]))
                  for n, w in zip(self.names, self.weights)]
        top = max(logits)
        exp = [math.exp(x - top) for x in logits]
        self.weights = [(1 - c) * e / sum(exp) + c / len(exp) for e in exp]

    def state_dict(self) -> dict:
        return {"step": self.step, "cursors": list(self.cursors), "weights": list(self.weights)}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.cursors, self.weights = state["step"], list(state["cursors"]), list(state["weights"])
