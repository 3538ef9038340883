"""Corpus and tokenizer of moekit's embedded default model: English and Chinese text from Debian packages.

    python recipes/embedded/prepare.py [--out recipes/embedded/data] [--vocab 6000]

Sources (installed with apt-get when missing):

- ``kjv``: the King James Bible (bible-kjv-text, public domain), one chapter per document,
  cleaned by recipes/kjv/prepare.py.
- ``en``: English fortunes (fortunes): quotations, proverbs, verse; only the files listed in
  EN_FILES (the offensive ``off/`` set and the technical / ASCII-art files are left out).
- ``zh``: Chinese fortunes (fortunes-zh): the 300 Tang poems, 100 Song poems and the
  ``chinese`` collection of classics, proverbs and ci, without its Debian manual excerpts.

Each source becomes one text file whose documents are separated by SEPARATOR. Every
round(1 / HELDOUT)-th document is held out (moekit.train.data.is_heldout, the rule
build_shard applies with ``heldout: HELDOUT``); the tokenizer is trained on the training documents only.
The byte-level BPE gets the special tokens </s> (id 0, eos), <s> (1, bos), <pad> (2) and
the XVERSE-MoE-Chat chat template in tokenizer_config.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
FORTUNES = Path("/usr/share/games/fortunes")
SEPARATOR = "\n%\n"
HELDOUT = 0.02
SPECIALS = ("</s>", "<s>", "<pad>")  # eos, bos, pad -> ids 0, 1, 2
EN_FILES = ("fortunes", "literature", "wisdom", "humorists", "people", "platitudes", "education", "science",
            "love", "food", "kids", "pets", "work", "tao", "miscellaneous", "riddles", "goedel", "songs-poems")
ZH_FILES = ("tang300", "song100", "chinese")
PACKAGES = {"bible-kjv": "/usr/bin/bible", "bible-kjv-text": "/usr/lib/bible.data",
            "fortunes": FORTUNES / "wisdom", "fortunes-zh": FORTUNES / "tang300"}
ANSI = re.compile(r"\x1b\[[0-9;]*m")
CJK = re.compile(r"[\u3400-\u9fff]")


def ensure_packages() -> None:
    """apt-get install the Debian packages whose files are missing; a clear error if that is impossible."""
    missing = [pkg for pkg, probe in PACKAGES.items() if not Path(probe).exists()
               and not (pkg == "bible-kjv" and shutil.which("bible"))]
    if not missing:
        return
    cmd = ["apt-get", "install", "-y", "-q", *missing]
    if os.geteuid() != 0:
        cmd = ["sudo", "-n", *cmd] if shutil.which("sudo") else cmd
    print(f"installing Debian packages {' '.join(missing)} ...", file=sys.stderr)
    try:
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    except (OSError, subprocess.CalledProcessError) as e:
        sys.exit(f"prepare.py: cannot install {' '.join(missing)} ({e}); install them yourself "
                 f"(as root: apt-get update && apt-get install {' '.join(missing)}) and run this again")


def kjv_documents() -> list[str]:
    """One document per chapter, one verse per line (recipes/kjv/prepare.py does the cleaning)."""
    spec = importlib.util.spec_from_file_location("kjv_prepare", ROOT / "recipes" / "kjv" / "prepare.py")
    kjv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kjv)
    return kjv.clean(kjv.dump_kjv()).strip().split("\n\n")


def fortunes(name: str) -> list[str]:
    """The entries of a fortune file, ANSI colours removed, tabs and trailing blanks tidied."""
    text = ANSI.sub("", (FORTUNES / name).read_text(encoding="utf-8", errors="replace"))
    out = []
    for entry in re.split(r"^%[ \t\r]*$", text, flags=re.M):
        lines = [ln.rstrip().replace("\t", "    ") for ln in entry.strip("\n").splitlines()]
        entry = "\n".join(lines).strip()
        entry = re.sub(r"\n\s+--\s*", "\n    -- ", entry)  # attribution lines in one style
        if entry:
            out.append(entry)
    return out


def english_documents() -> list[str]:
    docs = [d for f in EN_FILES for d in fortunes(f)]
    return [d for d in docs if len(d) <= 1500 and "\\" not in d]


def chinese_documents() -> list[str]:
    """Entries that are mostly Chinese: drops the manual excerpts (tables, commands) in ``chinese``."""
    docs = []
    for f in ZH_FILES:
        for d in fortunes(f):
            body = re.sub(r"\s", "", d)
            if body and len(CJK.findall(body)) >= 0.6 * len(body) and not re.search(r"[\u2500-\u257f]", d) \
                    and len(d) <= 1500:
                docs.append(d)
    return docs


def is_heldout(i: int, fraction: float = HELDOUT) -> bool:
    """Whether document ``i`` is held out: moekit.train.data.is_heldout, the rule build_shard applies."""
    from moekit.train.data import is_heldout as rule

    return rule(i, fraction)


def prepare(out: Path, vocab: int) -> dict:
    """Write {kjv,en,zh}.txt and tokenizer/ under ``out``; returns the corpus statistics."""
    from moekit.chat import TEMPLATES
    from moekit.tokenizer import Tokenizer
    from moekit.train.bpe import train_bpe
    from moekit.weights.io import atomic_write_text

    ensure_packages()
    out.mkdir(parents=True, exist_ok=True)
    corpus = {"kjv": kjv_documents(), "en": english_documents(), "zh": chinese_documents()}
    stats: dict = {"sources": {}}
    with tempfile.TemporaryDirectory() as tmp:
        train_files = []
        for name, docs in corpus.items():
            assert all(d.strip() == d and d and SEPARATOR not in d for d in docs), name
            atomic_write_text(out / f"{name}.txt", SEPARATOR.join(docs) + "\n")
            train_files.append(Path(tmp) / f"{name}.txt")
            train_files[-1].write_text("\n\n".join(d for i, d in enumerate(docs) if not is_heldout(i)))
        train_bpe(train_files, out / "tokenizer", vocab, specials=SPECIALS, chat_template=TEMPLATES["xverse-moe"],
                  add_bos=True)
    tok = Tokenizer.from_pretrained(out / "tokenizer")
    for name, docs in corpus.items():
        split = {"train": [d for i, d in enumerate(docs) if not is_heldout(i)],
                 "heldout": [d for i, d in enumerate(docs) if is_heldout(i)]}
        s = {"documents": len(docs), "characters": sum(map(len, docs))}
        for part, ds in split.items():
            s[f"{part}_documents"] = len(ds)
            s[f"{part}_tokens"] = sum(len(tok.encode(d)) + 1 for d in ds)  # + EOS, as the trainer counts
        s["characters_per_token"] = round(s["characters"] / (s["train_tokens"] + s["heldout_tokens"]), 3)
        stats["sources"][name] = s
    stats["vocab_size"] = tok.vocab_size
    atomic_write_text(out / "corpus.json", json.dumps(stats, indent=2))
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=HERE / "data")
    ap.add_argument("--vocab", type=int, default=6000)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    stats = prepare(args.out, args.vocab)
    for name, s in stats["sources"].items():
        print(f"{name}: {s['documents']:,} documents, {s['characters']:,} characters, {s['train_tokens']:,} train / "
              f"{s['heldout_tokens']:,} held-out tokens ({s['characters_per_token']} characters per token)")
    print(f"tokenizer: {stats['vocab_size']} tokens in {args.out / 'tokenizer'}")


if __name__ == "__main__":
    main()
