"""Short chat examples for the default model's fine-tune, made from the training split of the corpus.

    python recipes/embedded/dialogues.py [--data recipes/embedded/data] [--n 800]

Writes data/chat.jsonl: one {"messages": [...]} conversation per line, in English and
Chinese. Replies are corpus text (a KJV verse containing the asked-for word, a fortune,
a Tang or Song poem, a proverb) or the model's fixed self-description; held-out documents
are never used, so held-out perplexity stays clean. Seeded: the same corpus gives the same file.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent

PERSONA_EN = ("I am moekit's demo model, a small mixture of experts trained on the King James Bible, fortunes and "
              "Chinese poems. Ask me for a verse, a fortune or a poem.")
PERSONA_ZH = ("我是 moekit 的演示模型，一个小小的混合专家模型，读过圣经、格言和古诗。"
              "请让我背一首诗或说一句格言。")
GREETINGS_EN = ("Hello", "Hello!", "Hi", "Hi there", "Hey", "Good morning", "Good evening", "Greetings")
ABOUT_EN = ("Who are you?", "What are you?", "What can you do?", "Tell me about yourself.", "What is your name?")
GREETINGS_ZH = ("你好", "你好！", "您好", "嗨", "早上好", "晚上好")
ABOUT_ZH = ("你是谁？", "你能做什么？", "介绍一下你自己。", "你叫什么名字？")
TOPICS = ("love", "light", "water", "bread", "peace", "wisdom", "mercy", "fire", "sea", "king", "heaven", "earth",
          "truth", "joy", "fear", "faith", "hope", "river", "mountain", "wine", "sheep", "gold", "night", "morning",
          "strength", "children", "house", "word", "spirit", "life")
VERSE_ASKS = ("Quote a verse about {}.", "Give me a Bible verse about {}.", "What does the Bible say about {}?",
              "A verse about {}, please.")
FORTUNE_ASKS = ("Tell me a fortune.", "Give me a quote.", "Say something wise.", "Give me a fortune cookie.",
                "Share a saying.", "Tell me something to think about.")
TANG_ASKS = ("给我一首唐诗", "背一首唐诗", "来一首唐诗吧", "请念一首唐诗。")
SONG_ASKS = ("给我一首宋诗", "背一首宋诗", "来一首宋诗吧")
THEME_ASKS = ("给我一首关于{}的诗", "背一首写{}的诗", "有没有写{}的诗？")
THEMES = ("月", "春", "山", "水", "酒", "风", "花", "雨", "雪", "秋", "夜", "江")
PROVERB_ASKS = ("说一句谚语", "给我一句名言", "讲一句格言", "说一句有道理的话。")


def training_docs(path: Path) -> list[str]:
    """The training documents of a prepared source (prepare.is_heldout decides)."""
    from prepare import SEPARATOR, is_heldout

    docs = [d.strip() for d in path.read_text(encoding="utf-8").split(SEPARATOR) if d.strip()]
    return [d for i, d in enumerate(docs) if not is_heldout(i)]


def conversations(data: Path, n: int, seed: int = 0) -> list[list[dict]]:
    """About ``n`` conversations of one or two turns."""
    rng = random.Random(seed)
    verses = [v for ch in training_docs(data / "kjv.txt") for v in ch.split("\n") if 40 <= len(v) <= 200]
    en = [d for d in training_docs(data / "en.txt") if 20 <= len(d) <= 220]
    zh = training_docs(data / "zh.txt")
    tang = [d for d in zh if "作者：" in d and len(d) <= 160]
    song = [d for d in zh if "作者:" in d and len(d) <= 160]
    proverbs = [d for d in zh if "作者" not in d and len(d) <= 60]

    def turn(user: str, reply: str) -> list[dict]:
        return [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]

    def verse(topic: str) -> str:
        hits = [v for v in verses if re.search(rf"\b{topic}\b", v, re.I)]
        return rng.choice(hits or verses)

    def themed(ch: str) -> str:
        hits = [p for p in tang + song if ch in p.split("\n", 2)[-1]]
        return rng.choice(hits or tang)

    # each kind of reply opens with its own short lead-in, so the first tokens say what follows
    makers = [
        (0.025, lambda: turn(rng.choice(GREETINGS_EN), "Hello! " + PERSONA_EN)),
        (0.02, lambda: turn(rng.choice(ABOUT_EN), PERSONA_EN)),
        (0.025, lambda: turn(rng.choice(GREETINGS_ZH), "你好！" + PERSONA_ZH)),
        (0.02, lambda: turn(rng.choice(ABOUT_ZH), PERSONA_ZH)),
        (0.24, lambda: (t := rng.choice(TOPICS),
                        turn(rng.choice(VERSE_ASKS).format(t), f"A verse about {t}:\n{verse(t)}"))[1]),
        (0.20, lambda: turn(rng.choice(FORTUNE_ASKS), "Here is a fortune:\n" + rng.choice(en))),
        (0.11, lambda: turn(rng.choice(TANG_ASKS), "好的，这是一首唐诗：\n" + rng.choice(tang))),
        (0.05, lambda: turn(rng.choice(SONG_ASKS), "好的，这是一首宋诗：\n" + rng.choice(song))),
        (0.09, lambda: (t := rng.choice(THEMES),
                        turn(rng.choice(THEME_ASKS).format(t), f"写{t}的诗：\n" + themed(t)))[1]),
        (0.12, lambda: turn(rng.choice(PROVERB_ASKS), "古人说：" + rng.choice(proverbs))),
        (0.05, lambda: (t := rng.choice(TOPICS),
                        turn(rng.choice(VERSE_ASKS).format(t), f"A verse about {t}:\n{verse(t)}")
                        + turn(rng.choice(FORTUNE_ASKS), "Here is a fortune:\n" + rng.choice(en)))[1]),
    ]
    weights = [w for w, _ in makers]
    return [rng.choices(makers, weights)[0][1]() for _ in range(n)]


def write(data: Path, n: int = 800, seed: int = 0) -> Path:
    from moekit.weights.io import atomic_write_text

    out = data / "chat.jsonl"
    rows = conversations(data, n, seed)
    atomic_write_text(out, "".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in rows))
    return out


def main() -> None:
    import sys

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=HERE / "data")
    ap.add_argument("--n", type=int, default=800)
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    out = write(args.data, args.n)
    print(f"{out}: {args.n} conversations")


if __name__ == "__main__":
    main()
