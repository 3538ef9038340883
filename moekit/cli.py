"""The ``moekit`` command: a thin layer over the library's functions.

moekit's own errors (:class:`moekit.errors.MoekitError`, :class:`CheckpointError`, :class:`UsageError`)
print as one line and exit 2; anything else is a bug and keeps its traceback. Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from moekit.cliargs import UsageError, default_model, memory_flags, offload_summary, positive_int, quant_flags
from moekit.errors import MoekitError
from moekit.weights.io import CheckpointError

log = logging.getLogger("moekit")


def _text(value: str, what: str) -> str:
    """``value`` with bytes that were not UTF-8 (Python keeps them as surrogate escapes) replaced by U+FFFD,
    and a note naming ``what``; the tokenizers cannot encode surrogates."""
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        pass
    try:
        raw = value.encode("utf-8", errors="surrogateescape")  # the bytes as given
    except UnicodeEncodeError:  # surrogates that are not escaped bytes
        raw = value.encode("utf-8", errors="replace")
    fixed = raw.decode("utf-8", errors="replace")
    bad = sum(0xD800 <= ord(c) <= 0xDFFF for c in value)
    log.warning("%s: %d byte(s) are not valid UTF-8; replaced with U+FFFD", what, bad)
    return fixed


def cmd_info(args: argparse.Namespace) -> None:
    from moekit.describe import describe
    from moekit.presets import PRESETS, preset
    from moekit.weights import read_config

    target = args.model
    embedded = target is None or (target == "default" and not Path(target).exists())
    if embedded:
        target = default_model()
    if target in PRESETS:
        cfg, name = preset(target), target
    elif Path(target).exists():
        cfg, _, files, _ = read_config(target)
        size = sum(f.stat().st_size for f in files)
        name = f"{'embedded default model ' * embedded}{target} ({len(files)} shard{'s' * (len(files) > 1)}, " \
               f"{size / 2**20:,.1f} MiB)"
    else:
        raise UsageError(f"{target!r} is neither a checkpoint folder nor a preset ({', '.join(PRESETS)})")
    print("\n".join(describe(cfg, name)))
    if args.kernels:
        print("\n".join(_kernel_lines(cfg, args.dtype)))


def _kernel_lines(cfg, dtype: str | None) -> list[str]:
    """This machine, and which kernel runs each op of ``cfg`` when loaded (``info --kernels``)."""
    import torch

    from moekit.config import count_params
    from moekit.kernels import get_backend
    from moekit.machine import cpu_info, isa
    from moekit.weights.load import as_dtype

    info = cpu_info()
    dt = as_dtype(dtype or cfg.extra.get("torch_dtype") or "float32")
    lines = ["", f"machine: {info['model'] or 'unknown CPU'}, {torch.get_num_threads()} torch threads; "
             f"ISA: {' '.join(isa()) or 'none of AVX2 / AVX-512 / AMX'}; torch {torch.__version__}",
             f"loaded as {str(dt).removeprefix('torch.')} on the CPU:"]
    return lines + get_backend("auto", count_params(cfg)[0], "cpu", dt).describe()



SAMPLING_FLAGS = {  # flag -> (type, help); None defaults defer to generation_config.json
    "max_new_tokens": (int, "tokens to generate at most"),
    "temperature": (float, "0 = greedy"),
    "top_k": (int, "keep the k most likely tokens (0 = off)"),
    "top_p": (float, "nucleus sampling mass (1 = off)"),
    "min_p": (float, "drop tokens below min_p x the top probability"),
    "repetition_penalty": (float, "transformers-style penalty on seen tokens (1 = off)"),
    "presence_penalty": (float, "OpenAI presence penalty"),
    "frequency_penalty": (float, "OpenAI frequency penalty"),
    "seed": (int, "makes sampling reproducible"),
}


def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint folder (default: the embedded demo model, docs/default-model.md)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="weights dtype (default: the config's)")
    p.add_argument("--kernels", default="auto", choices=["auto", "cpu", "reference"], help="kernel backend")
    quant_flags(p)
    memory_flags(p)
    p.add_argument("--threads", type=positive_int, help="CPU threads (default: all cores)")
    p.add_argument("--chat-format", help="override the chat format (xverse-moe, chatml, orion, vicuna, deepseek)")
    p.add_argument("--system", help="system message for chat formatting")
    for name, (typ, help_) in SAMPLING_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), type=typ, help=help_)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--stop-token-id", type=int, action="append", default=[], help="stop token id (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-sequence ids")


def _load(args: argparse.Namespace):
    import time

    import torch

    from moekit.chat import TEMPLATES
    from moekit.engine import CausalLM, SamplingParams

    if args.chat_format is not None and args.chat_format not in TEMPLATES:
        raise UsageError(f"--chat-format {args.chat_format!r}: not a chat format; choose one of {', '.join(TEMPLATES)}")
    if args.system is not None:
        args.system = _text(args.system, "--system")
    args.stop = [_text(s, "--stop") for s in args.stop]
    if args.threads:
        torch.set_num_threads(args.threads)
    given = {name: getattr(args, name) for name in SAMPLING_FLAGS if getattr(args, name) is not None}
    SamplingParams(**given, stop=tuple(args.stop))  # reject bad flags before the (slow) load
    if not args.model:
        args.model = default_model()
    if not (Path(args.model).is_dir() or args.model.endswith(".gguf") and Path(args.model).is_file()):
        raise UsageError(f"--model {args.model!r}: no such checkpoint folder or .gguf file")
    t0 = time.perf_counter()
    lm = CausalLM.from_pretrained(args.model, dtype=args.dtype, kernels=args.kernels, chat_format=args.chat_format,
                                  progress=True, quantize=args.quantize, group=args.group,
                                  max_memory=args.max_memory)
    print(f"loaded {args.model} ({lm.model.config.family}, {lm.model.embed.weight.dtype}) "
          f"in {time.perf_counter() - t0:.1f} s; {lm.model.kernels.describe()[0]} (moekit info --kernels)",
          file=sys.stderr)
    return lm


def _sampling(lm, args: argparse.Namespace, prompt_tokens: int):
    """Flags over generation_config.json; a default max_new_tokens is clamped to the context's room."""
    kw = {name: getattr(args, name) for name in SAMPLING_FLAGS}
    return lm.sampling(prompt_tokens, **kw, stop=tuple(args.stop), stop_token_ids=tuple(args.stop_token_id),
                       ignore_eos=args.ignore_eos)


def _chat_ids(lm, messages: list[dict], args: argparse.Namespace) -> list[int]:
    """Prompt ids from the chat format; a template that refuses system messages is reported as --system's."""
    from moekit.chat import ChatError

    budget = lm.prompt_budget(args.max_new_tokens)  # long chats drop their oldest rounds
    try:
        return lm.chat_format.encode(lm.tokenizer, messages, max_tokens=budget)
    except ChatError as e:
        if args.system and messages[0]["role"] == "system":
            try:
                lm.chat_format.encode(lm.tokenizer, messages[1:], max_tokens=budget)
            except ChatError:
                raise e from None
            raise UsageError(f"--system: the chat format ({lm.chat_format.name}) does not accept a system message "
                             f"({e}); leave out --system or choose another --chat-format") from None
        raise


def _print_stream(pieces) -> str:
    text = ""
    for piece in pieces:
        text += piece
        print(piece, end="", flush=True)
    print()
    return text


def cmd_generate(args: argparse.Namespace) -> None:
    from moekit.engine import TextGenerator

    prompt = _text(args.prompt, "--prompt")
    lm = _load(args)
    if args.chat:
        msgs = ([{"role": "system", "content": args.system}] if args.system else [])
        ids = _chat_ids(lm, msgs + [{"role": "user", "content": prompt}], args)
    else:
        ids = lm.tokenizer.encode(prompt)
    params = _sampling(lm, args, len(ids))
    gen = TextGenerator(lm.engine, lm.tokenizer)
    if args.stream:
        _print_stream(ev.text for ev in gen.stream([ids], params))
    else:
        print(gen.generate([ids], params)[0].text)
    if line := offload_summary(lm.model):
        print(line, file=sys.stderr)


def cmd_chat(args: argparse.Namespace) -> None:
    """Multi-turn chat. Past replies keep the ids the model produced (``token_ids`` on the assistant
    message), so a per-piece format such as XVERSE's puts exactly those ids in the next prompt; their
    text is ``decode(ids)``, what was printed, for formats that render one string. A turn that fails
    (a message too long for the context, ...) is reported and dropped; the session goes on."""
    if sys.stdin is None or sys.stdin.closed:
        raise UsageError("chat reads messages from standard input, which is closed; "
                         "use moekit generate --prompt ... for one answer")
    if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 reach _text instead of raising
        sys.stdin.reconfigure(errors="surrogateescape")
    lm = _load(args)
    try:
        _chat_loop(lm, args)
    finally:
        if line := offload_summary(lm.model):
            print(line, file=sys.stderr)


def _chat_loop(lm, args: argparse.Namespace) -> None:
    from moekit.engine import TextGenerator

    gen = TextGenerator(lm.engine, lm.tokenizer)
    system = [{"role": "system", "content": args.system}] if args.system else []
    if system:
        _chat_ids(lm, system + [{"role": "user", "content": "x"}], args)  # refuse --system before the first turn
    history: list[dict] = []
    print("chat with the model; /reset starts over, /exit quits", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            history = []
            print("(conversation reset)", file=sys.stderr)
            continue
        if not line.strip():
            continue
        turn = [{"role": "user", "content": _text(line, "your message")}]
        text, reply_ids, last = "", [], None
        try:
            ids = _chat_ids(lm, system + history + turn, args)
            for last in gen.stream([ids], _sampling(lm, args, len(ids))):
                text += last.text
                reply_ids.append(last.token_id)
                print(last.text, end="", flush=True)
        except MoekitError as e:  # the engine checks a prompt before generating from it
            print(f"moekit chat: error: {e} (message dropped; the conversation goes on)", file=sys.stderr)
            continue
        print()
        reply = {"role": "assistant", "content": text}
        if last.finish_reason == "stop" and isinstance(last.stop_reason, int):
            reply_ids.pop()  # the end-of-turn id: the format writes its own after the reply
        if not isinstance(last.stop_reason, str):  # a stop string cuts the text between ids: keep the text
            reply["token_ids"] = reply_ids
        history += turn + [reply]


def cmd_train(args: argparse.Namespace) -> None:
    import yaml

    from moekit.train import load_config, train

    overrides: dict = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--set {item!r}: expected key=value (dotted keys for nested fields)")
        node = overrides
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UsageError(f"--set {item!r}: {part} was given a value by an earlier --set")
        try:
            node[leaf] = yaml.safe_load(value)
        except yaml.YAMLError:
            node[leaf] = value  # a plain string; the field's type decides
    if not Path(args.config).is_file():
        raise UsageError(f"{args.config!r}: no such run file")
    rec = train(load_config(args.config, overrides), resume=args.resume)
    if rec:
        print(json.dumps({k: v for k, v in rec.items() if k not in ("load", "imbalance")}))


def cmd_plot(args: argparse.Namespace) -> None:
    from moekit.train.plot import plot_log

    logs = {}
    for item in args.logs:
        label, sep, path = item.partition("=")
        logs[label if sep else Path(item).parent.name or "run"] = path if sep else item
    for p in logs.values():
        if not Path(p).is_file():
            raise UsageError(f"{p!r}: no such log file")
    print(plot_log(logs, args.out, args.title))


def cmd_upcycle(args: argparse.Namespace) -> None:
    from moekit.upcycle import to_markdown, upcycle_checkpoint

    if not Path(args.model).is_dir():
        raise UsageError(f"--model {args.model!r}: no such checkpoint folder")
    rep = upcycle_checkpoint(args.model, args.out, calibration=args.calibration, tokenizer=args.tokenizer,
                             seq_len=args.seq_len, max_windows=args.windows, method=args.method,
                             experts=args.experts, top_k=args.top_k, shared=args.shared, gate=args.gate,
                             gate_init=args.gate_init, scale=args.scale, noise=args.noise, layout=args.layout,
                             seed=args.seed)
    print(to_markdown(rep), end="")
    print(f"wrote {rep['output']} (report: upcycle_report.md, upcycle_report.json)", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moekit", description="Mixture-of-Experts language models.")
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="architecture, layer layout and parameter counts")
    info.add_argument("model", nargs="?", help="checkpoint folder or preset name (default: the embedded model)")
    info.add_argument("--kernels", action="store_true", help="also this CPU and which kernel runs each op")
    info.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="with --kernels (default: config's)")
    info.set_defaults(func=cmd_info)
    gen = sub.add_parser("generate", help="continue a prompt (or answer it with --chat)")
    gen.add_argument("--prompt", required=True, help="the prompt text")
    gen.add_argument("--chat", action="store_true", help="format the prompt as a user chat message")
    gen.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    _model_flags(gen)
    gen.set_defaults(func=cmd_generate)
    chat = sub.add_parser("chat", help="interactive multi-turn chat in the terminal (/reset, /exit)")
    _model_flags(chat)
    chat.set_defaults(func=cmd_chat)
    from moekit.server import command as serve_command

    sv = sub.add_parser("serve", help="OpenAI-compatible server and web chat page")
    serve_command.add_arguments(sv)
    sv.set_defaults(func=serve_command.main)

    tr = sub.add_parser("train", help="pretrain, continue pretraining or fine-tune from a YAML run file")
    tr.add_argument("config", help="run file (see recipes/)")
    tr.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a run-file field, e.g. --set steps=200 --set optim.lr=1e-3")
    tr.set_defaults(func=cmd_train)
    pl = sub.add_parser("plot", help="loss and expert-load curves of training logs (PNG)")
    pl.add_argument("logs", nargs="+", help="log.jsonl files, optionally label=path")
    pl.add_argument("-o", "--out", default="training.png", help="output PNG")
    pl.add_argument("--title", default="")
    pl.set_defaults(func=cmd_plot)
    up = sub.add_parser("upcycle",
                        help="turn a dense LLaMA-style checkpoint into experts (LLaMA-MoE, sparse upcycling)")
    up.add_argument("--model", required=True, help="dense checkpoint folder (LlamaForCausalLM layout)")
    up.add_argument("--out", required=True, help="output checkpoint folder")
    up.add_argument("--method", required=True, choices=["random", "cluster", "importance", "copy"],
                    help="neuron split (random, balanced k-means, gradient importance) or full copies")
    up.add_argument("--experts", type=int, required=True, help="routed experts per layer")
    up.add_argument("--top-k", type=int, required=True, help="routed experts per token")
    up.add_argument("--shared", type=int, default=0, help="always-on shared experts (most important neurons)")
    up.add_argument("--gate", default="mlp", choices=["mlp", "linear"], help="LLaMA-MoE MLP gate or a linear router")
    up.add_argument("--gate-init", default="random", choices=["zero", "random", "centroids"])
    up.add_argument("--scale", type=float, help="routed output scale (default E/k for splits, 1 for copies)")
    up.add_argument("--noise", type=float, default=0.0, help="copy: relative std of noise added to each copy")
    up.add_argument("--layout", default="auto", choices=["auto", "llama_moe", "mixtral", "deepseek", "xverse"],
                    help="checkpoint family (auto: llama_moe, deepseek with shared experts)")
    up.add_argument("--calibration", help="text file: importance scores and the before/after loss report")
    up.add_argument("--tokenizer", help="tokenizer folder (default: the dense checkpoint's)")
    up.add_argument("--seq-len", type=int, default=256, help="calibration window length")
    up.add_argument("--windows", type=int, default=64, help="calibration windows at most")
    up.add_argument("--seed", type=int, default=0)
    up.set_defaults(func=cmd_upcycle)
    from moekit.weights import quantize_cli

    qz = sub.add_parser("quantize", help="int8 / int4 weights: a checkpoint in, a quantised checkpoint out")
    quantize_cli.add_arguments(qz)
    qz.set_defaults(func=quantize_cli.main)
    from moekit.eval import cli as eval_cli  # eval, leakage, route-stats: each module brings its own arguments

    eval_cli.register(sub)
    from moekit.weights import export_command  # moekit export --format gguf

    export_command.register(sub)
    return p


def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    args = (parser or build_parser()).parse_args(argv)
    notes = logging.StreamHandler(sys.stderr)  # the library's warnings, one line each
    notes.setFormatter(logging.Formatter(f"moekit {args.command}: note: %(message)s"))
    log.addHandler(notes)
    try:
        args.func(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except ValueError as e:  # moekit's own errors name the bad input; anything else is a bug: traceback
        if not isinstance(e, (MoekitError, CheckpointError)):
            raise
        print(f"moekit {args.command}: error: {e}", file=sys.stderr)
        return 2
    finally:
        log.removeHandler(notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
