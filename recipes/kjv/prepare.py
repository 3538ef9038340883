"""The King James Bible from Debian's bible-kjv-text (public domain) as training text, and a BPE tokenizer.

    python recipes/kjv/prepare.py [--out recipes/kjv/data] [--vocab 2048]

Installs the Debian packages if needed (apt), dumps the text with the package's ``bible``
reader, strips verse numbers and line wrapping (one verse per line), and separates
chapters with a blank line so each chapter is one training document.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path


def dump_kjv() -> str:
    if shutil.which("bible") is None:
        print("installing Debian packages bible-kjv and bible-kjv-text ...", file=sys.stderr)
        subprocess.run(["apt-get", "install", "-y", "-q", "bible-kjv", "bible-kjv-text"], check=True,
                       stdout=subprocess.DEVNULL)
    return subprocess.run(["bible", "Gen1:1-Rev22:21"], check=True, capture_output=True, text=True).stdout


def clean(raw: str) -> str:
    """'Genesis 1' headings start chapters; '  1 In the beginning ...' starts a verse (wrapped lines joined)."""
    chapters, verses = [], []
    for line in raw.splitlines():
        if re.fullmatch(r"\S.* \d+", line.strip()) and not line.startswith(" "):
            if verses:
                chapters.append("\n".join(verses))
            verses = []
        elif m := re.match(r"\s+\d+ (.*)", line):
            verses.append(m.group(1).strip())
        elif line.strip() and verses:
            verses[-1] += " " + line.strip()
    if verses:
        chapters.append("\n".join(verses))
    return "\n\n".join(chapters) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "data")
    ap.add_argument("--vocab", type=int, default=2048)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from moekit.train.bpe import train_bpe

    args.out.mkdir(parents=True, exist_ok=True)
    text = clean(dump_kjv())
    (args.out / "kjv.txt").write_text(text)
    train_bpe([args.out / "kjv.txt"], args.out / "tokenizer", args.vocab)
    print(f"{args.out / 'kjv.txt'}: {len(text):,} characters, {text.count(chr(10) * 2) + 1} chapters; "
          f"tokenizer in {args.out / 'tokenizer'}")


if __name__ == "__main__":
    main()
