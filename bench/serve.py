"""Serving speed seen by streaming clients: moekit serve vs transformers serve --continuous-batching vs llama-server.

    python bench/serve.py                        # the Orion card's two tables, all three servers (~8 min on 2 cores)
    python bench/serve.py --grid full            # every (clients, input length) pair
    python bench/serve.py --small                # smoke check: 1/4 clients, 128/512 tokens, 8 new tokens

Needs the test extra plus ``pip install accelerate matplotlib`` (transformers serve loads through
accelerate). The first run builds llama-server (several minutes on 2 cores) and the GGUF; later runs
reuse them from ``--cache``.

The Orion-MoE card measures its server "from the client, in tokens per second" at 1 and 4 concurrent
clients, and at input lengths 4k to 64k. Here the same two sweeps on this machine, on one checkpoint
(bench/serve_setup.py: Mixtral-shaped, 742M parameters, random bf16 weights, a KJV SentencePiece
tokenizer), served by each server in turn as a separate process with the same threads:

- clients: 1, 4, 16 and 64 concurrent clients, prompts of 128 tokens;
- input length: 128, 512, 2048 and 4096 tokens, one client.

Each client runs ``--rounds`` requests one after another through the official ``openai`` client
(``completions.create(stream=True)``: a KJV passage of the input length as text, ``--new`` new tokens,
greedy, ``ignore_eos``); every request has a different passage, so no prefix is shared. Per request:
tokens received / (last token time - send time). Reported per cell: the mean of that over requests
(per-client tok/s), all tokens / (last token of the cell - first send) (total tok/s), and time to first
token. Results: ``--out`` (default bench/results/<date>/) serve.json, serve.md, serve.png.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import serve_setup  # noqa: E402

SERVERS = ("moekit", "transformers", "llama.cpp")
LABEL = {"moekit": "moekit serve", "transformers": "transformers serve --continuous-batching",
         "llama.cpp": "llama.cpp llama-server"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(name: str, folder: Path, gguf: Path, binary: Path, port: int, args) -> list[str]:
    """The server's command line: same threads, room for every client's longest request."""
    seqs, ctx = max(args.clients), max(args.inputs) + args.new + 64
    t = str(args.threads)
    if name == "moekit":
        kv_gib = max(0.05, seqs * ctx * serve_setup.kv_bytes_per_token(folder) / 2**30 * 1.1)
        return [sys.executable, "-m", "moekit.cli", "serve", "--model", str(folder), "--port", str(port),
                "--threads", t, "--max-num-seqs", str(seqs), "--max-model-len", str(ctx),
                "--kv-memory", f"{kv_gib:.3f}"]
    if name == "transformers":
        block = 256  # its default page size; the cache gets the same room as moekit's (psutil absent: set it)
        blocks = -(-seqs * ctx // block) + seqs
        return ["transformers", "serve", str(folder), "--continuous-batching", "--device", "cpu", "--dtype",
                "bfloat16", "--cb-block-size", str(block), "--cb-num-blocks", str(blocks),
                "--cb-max-batch-tokens", "512", "--host", "127.0.0.1", "--port", str(port)]
    return [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", t, "-tb", t,
            "-np", str(seqs), "-c", str(seqs * ctx), "--no-warmup"]


@contextlib.contextmanager
def running(name: str, argv: list[str], port: int, log: Path, threads: int):
    """Start the server, wait for /health, yield its base URL; SIGTERM (then kill) at the end."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    with open(log, "wb") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; log {log}:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not answer /health in 600 s; log {log}")
            time.sleep(0.5)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def request_fields(name: str, new: int) -> dict:
    """Each server's way to say "exactly ``new`` tokens, EOS ignored" (transformers serve refuses unknown
    fields with 422 and ignores stream_options; it takes a GenerationConfig as JSON instead)."""
    if name == "transformers":
        gen = {"max_new_tokens": new, "do_sample": False, "eos_token_id": -1, "pad_token_id": 0}
        return {"extra_body": {"generation_config": json.dumps(gen)}}
    return {"stream_options": {"include_usage": True}, "extra_body": {"ignore_eos": True}}


async def one_request(client, model: str, prompt: str, new: int, fields: dict) -> dict:
    """One streamed completion: send time, token times (chunks with text), the server's usage if it sends one."""
    import openai

    sent = time.perf_counter()
    stamps, usage, error = [], None, None
    try:
        stream = await client.completions.create(model=model, prompt=prompt, max_tokens=new, temperature=0.0,
                                                 stream=True, **fields)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                stamps.append(time.perf_counter())
            if getattr(chunk, "usage", None):
                usage = chunk.usage
    except openai.APIError as e:  # a failed request is counted and reported, not a crash of the whole run
        error = f"{type(e).__name__}: {e} {getattr(e, 'body', None) or ''}".strip()
    tokens = usage.completion_tokens if usage else len(stamps)
    return {"sent": sent, "first": stamps[0] if stamps else None, "last": stamps[-1] if stamps else sent,
            "tokens": tokens, "chunks": len(stamps), "prompt_tokens": usage.prompt_tokens if usage else None,
            "error": error}


async def cell(url: str, model: str, prompts: list[list[str]], new: int, fields: dict) -> list[dict]:
    """len(prompts) clients, each sending its prompts one after another."""
    from openai import AsyncOpenAI

    try:
        import httpx2 as httpx  # what openai>=3 ships with
    except ImportError:
        import httpx

    limits = httpx.Limits(max_connections=len(prompts) + 8, max_keepalive_connections=len(prompts) + 8)
    async with httpx.AsyncClient(limits=limits, timeout=3600) as http:
        client = AsyncOpenAI(base_url=url + "/v1", api_key="bench", http_client=http, max_retries=0)

        async def loop(mine: list[str]) -> list[dict]:
            return [await one_request(client, model, p, new, fields) for p in mine]

        per_client = await asyncio.gather(*(loop(p) for p in prompts))
    return [dict(r, client=i) for i, rs in enumerate(per_client) for r in rs]


def summarize(reqs: list[dict]) -> dict:
    """Cell figures over the requests that succeeded; ``failed`` counts the others (their tokens are not counted)."""
    failed = [r for r in reqs if r["error"]]
    reqs = [r for r in reqs if not r["error"]] or reqs
    start, end = min(r["sent"] for r in reqs), max(r["last"] for r in reqs)
    rates = [r["tokens"] / (r["last"] - r["sent"]) for r in reqs if r["last"] > r["sent"]]
    ttft = [r["first"] - r["sent"] for r in reqs if r["first"] is not None]
    prompt = [r["prompt_tokens"] for r in reqs if r["prompt_tokens"] is not None]
    if len(failed) == len(reqs):
        return {"per_client_tps": None, "total_tps": None, "ttft_p50_s": None, "tokens": 0, "failed": len(failed),
                "first_error": failed[0]["error"], "prompt_tokens_mean": None, "wall_s": None}
    return {"per_client_tps": statistics.mean(rates), "total_tps": sum(r["tokens"] for r in reqs) / (end - start),
            "ttft_p50_s": statistics.median(ttft), "failed": len(failed),
            "first_error": failed[0]["error"] if failed else None, "tokens": sum(r["tokens"] for r in reqs),
            "prompt_tokens_mean": statistics.mean(prompt) if prompt else None, "wall_s": end - start}


class Passages:
    """Distinct KJV passages of an exact token count under the checkpoint's tokenizer."""

    def __init__(self, folder: Path):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
        self.ids = self.sp.encode(" ".join(serve_setup.kjv_lines()))
        self.at = 0

    def take(self, n: int) -> str:
        if self.at + n > len(self.ids):
            self.at = 0
        text = self.sp.decode(self.ids[self.at:self.at + n - 1])  # the server adds <s>
        self.at += n
        return text


def cells(args) -> list[tuple[int, int]]:
    if args.grid == "full":
        return [(c, n) for n in args.inputs for c in args.clients]
    return [(c, args.inputs[0]) for c in args.clients] + [(1, n) for n in args.inputs[1:]]


def run_server(name: str, paths, args, out: Path) -> list[dict]:
    folder, gguf, binary = paths
    port = free_port()
    argv = command(name, folder, gguf, binary, port, args)
    rows, passages = [], Passages(folder)
    print(f"== {LABEL[name]}: {' '.join(argv)}", flush=True)
    with running(name, argv, port, out / f"serve-{name.replace('.', '')}.log", args.threads) as url:
        model = "bench" if name == "llama.cpp" else str(folder)
        if name == "moekit":
            model = json.loads(urllib.request.urlopen(url + "/v1/models").read())["data"][0]["id"]
        asyncio.run(cell(url, model, [[passages.take(64)] for _ in range(2)], 8, request_fields(name, 8)))  # warm-up
        for clients, n in cells(args):
            prompts = [[passages.take(n) for _ in range(args.rounds)] for _ in range(clients)]
            reqs = asyncio.run(cell(url, model, prompts, args.new, request_fields(name, args.new)))
            row = {"server": name, "clients": clients, "input": n, **summarize(reqs), "requests": reqs}
            rows.append(row)
            print(f"  {clients:>3} clients x {n:>5} tokens: per client {row['per_client_tps']} tok/s, "
                  f"total {row['total_tps']} tok/s, TTFT p50 {row['ttft_p50_s']} s "
                  f"(prompt {row['prompt_tokens_mean']}, {row['tokens']} tokens, {row['failed']} failed"
                  + (f": {row['first_error']}" if row["failed"] else "") + ")", flush=True)
    return rows


# ----------------------------------------------------------------------------- report
def table(rows: list[dict], servers: list[str], key: str, cellset: list[tuple[int, int]]) -> list[str]:
    """One markdown table: a line per (clients, input), a column per server, moekit / each peer."""
    by = {(r["server"], r["clients"], r["input"]): r for r in rows}
    peers = [s for s in servers if s != "moekit"]
    head = ["clients", "input"] + [LABEL[s].split(" ")[0] for s in servers]
    head += [f"moekit / {LABEL[p].split(' ')[0]}" for p in peers if "moekit" in servers]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for c, n in cellset:
        got = [by.get((s, c, n)) for s in servers]
        vals = [("n/a" if not g or g[key] is None else f"{g[key]:.2f}")
                + (f" ({g['failed']} of {len(g['requests'])} failed)" if g and g["failed"] else "") for g in got]
        ours = by.get(("moekit", c, n))
        for p in peers:
            theirs = by.get((p, c, n))
            if "moekit" in servers:
                ok = ours and theirs and ours[key] and theirs[key] and not ours["failed"] and not theirs["failed"]
                vals.append(f"{ours[key] / theirs[key]:.2f}x" if ok else "n/a")
        lines.append(f"| {c} | {n} | " + " | ".join(vals) + " |")
    return lines


def report(result: dict, out: Path) -> str:
    rows, servers, cellset = result["rows"], result["servers"], [tuple(c) for c in result["cells"]]
    md = [f"{result['date']}, {result['cpu']}, {result['threads']} threads each; {result['new']} new tokens "
          f"per request, {result['rounds']} request(s) per client, greedy, EOS ignored.",
          f"Command: `{result['command']}`", "", "Per-client tok/s (mean over requests of tokens / request time):", ""]
    md += table(rows, servers, "per_client_tps", cellset)
    md += ["", "Total tok/s (all tokens / cell time):", ""] + table(rows, servers, "total_tps", cellset)
    md += ["", "Time to first token, median (s):", ""] + table(rows, servers, "ttft_p50_s", cellset)
    text = "\n".join(md) + "\n"
    (out / "serve.md").write_text(text)
    plot(rows, servers, cellset, out / "serve.png", result)
    return text


def plot(rows, servers, cellset, path: Path, result) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conc = sorted({c for c, n in cellset if n == cellset[0][1]})
    lens = sorted({n for c, n in cellset if c == 1})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for s in servers:
        mine = {(r["clients"], r["input"]): r for r in rows if r["server"] == s}
        for ax, key, xs, pick in ((axes[0], "total_tps", conc, lambda x: (x, cellset[0][1])),
                                  (axes[1], "per_client_tps", conc, lambda x: (x, cellset[0][1])),
                                  (axes[2], "per_client_tps", lens, lambda x: (1, x))):
            pts = [(x, mine[pick(x)][key]) for x in xs if pick(x) in mine and mine[pick(x)][key] is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=LABEL[s])
    titles = (f"total tok/s, {cellset[0][1]}-token prompts", f"per-client tok/s, {cellset[0][1]}-token prompts",
              "per-client tok/s, one client")
    for ax, title, xl in zip(axes, titles, ("concurrent clients", "concurrent clients", "input tokens")):
        ax.set_xscale("log", base=2)
        ax.set_title(title)
        ax.set_xlabel(xl)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Streaming clients, Mixtral-shaped 742M bf16, {result['cpu']}, {result['threads']} threads "
                 f"({result['date']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--servers", default=",".join(SERVERS), help=f"comma-separated, of {', '.join(SERVERS)}")
    ap.add_argument("--clients", default="1,4,16,64", help="concurrent clients")
    ap.add_argument("--inputs", default="128,512,2048,4096", help="input lengths in tokens (the first: clients sweep)")
    ap.add_argument("--grid", choices=("card", "full"), default="card",
                    help="card: clients at the first input length + input lengths at one client; full: all pairs")
    ap.add_argument("--new", type=int, default=64, help="new tokens per request")
    ap.add_argument("--rounds", type=int, default=2, help="requests per client, one after another")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads of each server")
    ap.add_argument("--gguf-type", default="bf16", choices=("bf16", "f16"), help="llama.cpp converter --outtype")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "moekit", help="built files (reused)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / time.strftime("%Y-%m-%d"))
    ap.add_argument("--small", action="store_true", help="smoke check: 1/4 clients, 128/512 tokens, 8 new")
    args = ap.parse_args()
    if args.small:
        args.clients, args.inputs, args.new, args.rounds = "1,4", "128,512", 8, 1
    args.clients = [int(x) for x in args.clients.split(",")]
    args.inputs = [int(x) for x in args.inputs.split(",")]
    servers = args.servers.split(",")
    unknown = sorted(set(servers) - set(SERVERS))
    if unknown:
        raise SystemExit(f"--servers: unknown {unknown}; choose from {', '.join(SERVERS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    paths = serve_setup.build_all(args.cache, args.gguf_type, llama="llama.cpp" in servers)
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu_model(), "threads": args.threads,
              "command": "python " + " ".join(sys.argv), "new": args.new, "rounds": args.rounds,
              "servers": servers, "cells": cells(args), "gguf": paths[1] and paths[1].name, "rows": []}
    for name in servers:
        result["rows"] += run_server(name, paths, args, args.out)
        (args.out / "serve.json").write_text(json.dumps(result, indent=1))
    print(report(result, args.out))
    print(f"wrote {args.out}/serve.json, serve.md, serve.png")


if __name__ == "__main__":
    main()
