"""The `slm` command. Each subcommand parses its flags and calls the module that does the work.

User mistakes (missing files, bad settings) raise slm.errors.SlmError; they are printed as one line and exit
with status 2. Anything else is a bug and keeps its traceback.

One module of ~470 lines because it is the whole command line: a `cmd_<name>` and an `add_<name>` of a few
lines for each of ten subcommands, and the one error boundary they share.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import sys
import time
from pathlib import Path
from typing import NoReturn

from slm.config import PRESETS
from slm.errors import SlmError
from slm.outputs import os_error_line


def _presets_help() -> str:
    lines = ["presets (parameters):"]
    for name, p in PRESETS.items():
        lines.append(f"  {name:<10} {p.config.num_parameters():>11,}  {p.description}")
    return "\n".join(lines)


# ---- subcommands ----------------------------------------------------------------------------------------
def cmd_info(args: argparse.Namespace) -> int:
    from slm.machine import report

    print("\n".join(report()) + "\n")
    print(_presets_help())
    for name, p in PRESETS.items():
        if p.why:
            print(f"\nwhy {name}: {p.why}")
        if p.training:
            recipe = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in p.training.items())
            print(f"  trains by default with: {recipe}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from slm.prepare import prepare

    given = {name: getattr(args, name) for name in args.prepare_flags if getattr(args, name) is not None}
    meta = prepare(args.inputs, args.out, progress=not args.quiet, force=args.force, **given)
    how = {"documents": f"whole documents ({meta['val_fraction']:.0%} of them, chosen by hash)",
           "tail": f"the last {meta['val_fraction']:.0%} of each document (too few documents to hold whole ones out)",
           "none": "none (--val-fraction 0): training will report no validation loss"}[meta["split"]]
    print(f"validation split: {how}")
    for split in ("train", "val"):
        s = meta[split]
        unit = "documents" if meta["split"] != "tail" else "document parts"
        print(f"{split}: {s['documents']:,} {unit}, {s['tokens']:,} tokens, "
              f"{s['bytes_per_token']:.2f} bytes/token")
    print(f"wrote {args.out}/train.bin, val.bin, tokenizer.json, meta.json in {meta['seconds']} s")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from slm.memory import keep_freed_memory
    from slm.train import train
    from slm.train_config import TrainConfig, TrainError, load_config_file, resume_settings, settings_under_flags

    # The saved run's settings (with --resume), then the config file, then flags: each overrides the last.
    values, model_overrides = resume_settings(args.out) if args.resume else ({}, {})
    if args.config:
        file_values, file_model = load_config_file(args.config)
        values, model_overrides = {**values, **file_values}, {**model_overrides, **file_model}
    for f in dataclasses.fields(TrainConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    for key in args.model_flags:
        if getattr(args, key) is not None:
            model_overrides[key] = getattr(args, key)
    if args.init_from and args.preset:
        raise TrainError(f"--init-from {args.init_from} keeps that model's shape; drop --preset {args.preset}")
    cfg = TrainConfig(**{**settings_under_flags(values), **values})
    keep_freed_memory()  # this process only trains: reuse freed memory instead of faulting pages in every step
    result = train(args.data, args.out, cfg, model_overrides, resume=args.resume, progress=not args.quiet,
                   force=args.force)
    if int(os.environ.get("RANK", 0)) == 0:
        done = f"done: {result['steps']} steps, {result['tokens_seen']:,} tokens, {result['wall_time_s']} s; "
        if result["best_val_loss"] is None:
            print(done + f"no validation split, so no best/: the checkpoint is {args.out}/last")
        else:
            print(done + f"best val loss {result['best_val_loss']:.4f}, {result['best_val_bpb']:.3f} bits/byte "
                  f"(step {result['best_step']}) -> {args.out}/best; latest -> {args.out}/last")
    return 0


def _load_model(name: str, threads: int | None = None):
    import torch

    from slm.checkpoint import load, resolve

    if threads:
        torch.set_num_threads(threads)
    model, tokenizer = load(name)
    path = resolve(name)
    if path != Path(name):  # say what "default" or a run directory stood for
        print(f"model: {path}", file=sys.stderr)
    return model, tokenizer


def given_prompt(args: argparse.Namespace) -> str:
    """--prompt, or the text of --prompt-file (``-``: standard input)."""
    if args.prompt_file is None:
        return args.prompt
    if args.prompt:
        raise SlmError("--prompt and --prompt-file: give one of them")
    if args.prompt_file == "-":
        return sys.stdin.read()
    path = Path(args.prompt_file)
    if not path.is_file():
        raise SlmError(f"--prompt-file {path}: {'a directory' if path.is_dir() else 'not found'}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SlmError(f"--prompt-file {path}: not UTF-8 text (byte {e.start})") from e


def story_prompt(args: argparse.Namespace) -> tuple[str, tuple[str, ...]]:
    """The text to continue and the requested words: --prompt, after the header built from --words and
    --features when they are given (only for a model trained on that format)."""
    from slm.checkpoint import template
    from slm.instruct import InstructError, header, make_request

    def items(value: str | None) -> list[str]:
        return [x for x in (value or "").split(",") if x.strip()]

    request = make_request(items(args.words), items(args.features))
    if request and not template(args.model):
        raise InstructError(f"--words/--features: the model {args.model} was not trained to follow requests (no "
                            "template in its config.json); fine-tune it on `slm prepare --instruct` data first")
    prompt = (header(request) if request else "") + given_prompt(args)
    if not prompt:
        raise InstructError("--prompt is empty: give some text to continue, or --words for a story")
    return prompt, request.words


def cmd_generate(args: argparse.Namespace) -> int:
    from slm.generation import Engine, SamplingParams
    from slm.instruct import used_words

    prompt, words = story_prompt(args)
    if any(not s for s in args.stop or ()):
        raise SlmError("--stop: an empty string would stop before the first token; give the text to stop before")
    given = {name: getattr(args, name) for name in args.sampling_flags if getattr(args, name) is not None}
    params = SamplingParams(**given, stop=tuple(args.stop or ()), words=words)
    model, tokenizer = _load_model(args.model, args.threads)
    ids = tokenizer.encode(prompt)
    engine = Engine(model, tokenizer, max_batch=1, use_cache=not args.no_kv_cache,
                    decode_weights=args.decode_weights)
    seq = engine.add(ids, params)
    if seq.prompt_truncated:
        print(f"note: the prompt has {len(ids)} tokens, more than the context of {engine.context}; "
              f"keeping its last {engine.context}", file=sys.stderr)
    started = time.perf_counter()
    if args.stream and not args.json:
        print(prompt, end="", flush=True)
    for _ in engine.run([seq]):
        if args.stream and not args.json:
            print(seq.take_text(), end="", flush=True)
    seconds = time.perf_counter() - started
    n = len(seq.generated)
    if args.json:
        print(json.dumps({
            "prompt": prompt, "text": seq.text, "prompt_tokens": len(ids), "generated_tokens": n,
            "prompt_truncated_tokens": seq.prompt_truncated, "finish_reason": seq.finish_reason,
            "seconds": round(seconds, 4), "tokens_per_second": round(n / seconds, 2) if seconds else None,
            "kv_cache": not args.no_kv_cache, "native_step": engine.native is not None,
            "decode_weights": args.decode_weights,
            **({"words": list(words), "words_used": used_words(seq.text, words)} if words else {}),
        }))
    elif args.stream:
        print()
    else:
        print(prompt + seq.text)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from slm.evaluate import evaluate_files

    model, tokenizer = _load_model(args.model, args.threads)
    results = evaluate_files(model, tokenizer, args.files, batch_size=args.batch_size, stride=args.stride)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results["files"] + [results["total"]]:
            print(f"{r['name']}: {r['tokens']:,} tokens, {r['bytes']:,} bytes | loss {r['loss']:.4f} | "
                  f"perplexity {r['perplexity']:.2f} | {r['bits_per_byte']:.4f} bits/byte")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from slm.bench import run_bench

    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    text = Path(args.text).read_text(encoding="utf-8") if args.text else None
    run_bench(args.model, args.preset, lengths, repeats=args.repeats, threads=args.threads,
              json_path=args.json, plot_path=args.plot, hf=not args.no_hf, dtype=args.dtype,
              llama_cpp=False if args.no_llama_cpp else None, text=text)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from slm.checkpoint import resolve
    from slm.export import export_hf
    from slm.outputs import new_directory

    model, tokenizer = _load_model(args.model)
    with new_directory(args.out, [resolve(args.model)], args.force) as out:
        export_hf(model, out, tokenizer)
    kind = "LlamaForCausalLM" if model.config.arch == "llama" else "GPT2LMHeadModel"
    print(f"wrote a {kind} directory to {args.out}")
    return 0


def cmd_export_gguf(args: argparse.Namespace) -> int:
    from slm.checkpoint import resolve
    from slm.gguf_export import export_gguf
    from slm.outputs import new_file

    model, tokenizer = _load_model(args.model)
    with new_file(args.out, [resolve(args.model)], args.force) as tmp:
        export_gguf(model, tokenizer, tmp, args.dtype, name=Path(str(args.model)).name)
    path = Path(args.out)
    print(f"wrote {path} ({model.config.arch}, {args.dtype}, {path.stat().st_size:,} bytes)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from slm.checkpoint import check
    from slm.server.app import run_server

    check(args.model)  # a broken checkpoint is one line here, not a traceback from inside the server's start
    run_server(model=args.model, host=args.host, port=args.port)
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    app = Path(__file__).parent / "ui" / "app.py"
    env = dict(os.environ)
    if args.api_url:
        env["SLM_API_URL"] = args.api_url
    cmd = [sys.executable, "-m", "streamlit", "run", str(app), "--server.port", str(args.port),
           "--server.address", args.host, "--server.headless", "true", "--browser.gatherUsageStats", "false"]
    os.execve(sys.executable, cmd, env)  # become streamlit, so signals reach it directly
    return 0


# ---- parser ---------------------------------------------------------------------------------------------
FIELD_TYPES = {"int": int, "float": float, "str": str, "int | None": int, "float | None": float, "str | None": str}


def add_settings(group: argparse._ActionsContainer, settings: type, show_defaults: bool = True) -> list[str]:
    """One flag per field of a settings dataclass that has help text (config.setting): its type, choices and
    help come from the field. The flag's own default is None, so that only the flags given override a preset,
    a --config file or a resumed run's settings; the field's default is shown in the help. Returns the names."""
    names = []
    for f in dataclasses.fields(settings):
        if "help" not in f.metadata:
            continue
        extra = {k: v for k, v in f.metadata.items() if k != "help"}
        shown = f" (default {f.default})" if show_defaults and f.default not in ("", None) else ""
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool", "bool | None"):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                               help=f.metadata["help"] + shown)
        else:
            group.add_argument(flag, type=FIELD_TYPES[str(f.type)], default=None, help=f.metadata["help"] + shown,
                               **extra)
        names.append(f.name)
    return names


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _force_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="replace --out if it already holds something")


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=os.environ.get("SLM_MODEL", "default"),
                   help="checkpoint directory, or 'default' for the bundled model (env SLM_MODEL)")


def add_prepare(sub: argparse._SubParsersAction) -> None:
    from slm.prepare import PrepareConfig

    p = sub.add_parser("prepare", help="corpus -> tokenizer + train.bin/val.bin")
    p.add_argument("inputs", nargs="*", help=".txt/.md files, directories, .jsonl(.gz), .parquet")
    p.add_argument("--out", required=True, help="output directory (new or empty; written whole or not at all)")
    _force_arg(p)
    p.set_defaults(prepare_flags=add_settings(p, PrepareConfig))
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_prepare)


def add_train(sub: argparse._SubParsersAction) -> None:
    from slm.config import ModelConfig
    from slm.train_config import TrainConfig

    p = sub.add_parser("train", help="train a model on a prepared data directory",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_presets_help())
    p.add_argument("--data", required=True, help="directory written by `slm prepare`")
    p.add_argument("--out", required=True, help="run directory (best/, last/, metrics.jsonl, loss.png)")
    p.add_argument("--config", help="TOML file of training settings and a [model] table")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from last/ with the settings it was saved with (flags given now "
                   "override them; --max-minutes is per leg)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar or log lines (metrics.jsonl still records every figure)")
    p.add_argument("--force", action="store_true",
                   help="start over in an --out that holds an earlier run or other files (they are deleted)")
    settings = p.add_argument_group("training settings", "slm.train_config.TrainConfig's defaults; a preset's own "
                                    "recipe (slm info) or --init-from's fine-tuning recipe replaces some of them")
    add_settings(settings, TrainConfig)
    shape = p.add_argument_group("model shape", "the preset's (slm info) unless given; recorded in the run's "
                                 "config.json")
    p.set_defaults(func=cmd_train, model_flags=add_settings(shape, ModelConfig, show_defaults=False))


def add_generate(sub: argparse._SubParsersAction) -> None:
    from slm.generation import SamplingParams

    p = sub.add_parser("generate", help="continue a prompt",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_presets_help())
    _model_arg(p)
    p.add_argument("--prompt", default="", help="text to continue (with --words: the story's first words)")
    p.add_argument("--prompt-file", metavar="FILE", help="read the prompt from FILE (- for standard input)")
    p.add_argument("--words", metavar="A,B,C", help="ask for a story that uses these words (at most 8; for models "
                   "trained with `slm prepare --instruct`); the prompt shown starts with the request")
    p.add_argument("--features", metavar="F", help="with --words: features the story should have (dialogue)")
    sampling = add_settings(p.add_argument_group("sampling (slm.generation.SamplingParams)"), SamplingParams)
    p.add_argument("--stop", action="append", help="stop before this string (repeatable)")
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the whole window every token")
    p.add_argument("--decode-weights", choices=["fp32", "fp16"], default="fp32",
                   help="fp16: the native decode step reads fp16 copies of the matrices (faster, not bit-exact)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--json", action="store_true", help="print text, token counts, seconds and tokens/s as JSON")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.set_defaults(func=cmd_generate, sampling_flags=sampling)


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="loss, perplexity and bits per byte on text files")
    _model_arg(p)
    p.add_argument("files", nargs="+", help="text files (.txt, .md, .jsonl, .jsonl.gz, .parquet)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--stride", type=positive_int, default=None, help="sliding-window stride (default context/2)")
    p.add_argument("--threads", type=positive_int, default=None)
    p.set_defaults(func=cmd_eval)


def add_bench(sub: argparse._SubParsersAction) -> None:
    from slm.train_config import TrainConfig

    p = sub.add_parser("bench", help="decode speed: KV cache vs none vs transformers vs llama.cpp")
    p.add_argument("--model", default=None, help="checkpoint directory or 'default' (else random weights)")
    p.add_argument("--preset", default=TrainConfig.preset, help="shape for random weights when no --model")
    p.add_argument("--lengths", default="64,128,256,512")
    p.add_argument("--repeats", type=positive_int, default=3, help="runs per measurement (median)")
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument("--dtype", default="fp32", help="fp32 | bf16 | fp16 weights for our engine")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    p.add_argument("--text", help="a text file to measure the fp16 weights' bits-per-byte change on (its first "
                   "4096 tokens; else the fp32 greedy tokens, in bits per token)")
    p.add_argument("--no-llama-cpp", action="store_true",
                   help="skip llama.cpp's columns (otherwise added when `make llama-cpp` has built its tools)")
    p.add_argument("--json", help="write the figures to this JSON file")
    p.add_argument("--plot", help="write a PNG of tokens/s against length")
    p.set_defaults(func=cmd_bench)


def add_serving(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="the HTTP API")
    _model_arg(p)
    p.add_argument("--host", default=os.environ.get("SLM_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("SLM_PORT", "8000")))
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("ui", help="the Streamlit playground")
    p.add_argument("--port", type=int, default=8501)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--api-url", default=None, help="API base URL (env SLM_API_URL, default http://127.0.0.1:8000)")
    p.set_defaults(func=cmd_ui)


def add_exports(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-hf", help="write a Hugging Face directory (GPT2LMHeadModel or LlamaForCausalLM)")
    _model_arg(p)
    p.add_argument("--out", required=True, help="the directory to write (new or empty)")
    _force_arg(p)
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("export-gguf", help="write a GGUF file for llama.cpp and ollama")
    _model_arg(p)
    p.add_argument("--out", required=True, help="the .gguf file to write (a new one)")
    _force_arg(p)
    p.add_argument("--dtype", default="f32", choices=["f32", "f16"], help="matrices in f32 or f16")
    p.set_defaults(func=cmd_export_gguf)


class Parser(argparse.ArgumentParser):
    """argparse, with its mistakes in one line (`slm train: error: ...`) and exit status 2, like every other."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="slm", description="A small GPT: prepare data, train, generate, serve.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_presets_help())
    parser.add_argument("--version", action="version", version=f"slm {__import__('slm').__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="this machine (CPU, features, what auto picks) and the model presets").set_defaults(
        func=cmd_info)
    for add in (add_prepare, add_train, add_generate, add_eval, add_bench, add_serving, add_exports):
        add(sub)
    return parser


# OSErrors that say something about the user's machine, not about slm: a full disk, a read-only filesystem,
# a permission; each is one line. Any other OSError is a bug and keeps its traceback.
USER_OS_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR,
                  errno.ELOOP, errno.ENAMETOOLONG, errno.EMFILE, errno.EFBIG)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (SlmError, FileNotFoundError) as e:  # a mistake the user can fix: one line, no traceback
        print(f"slm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"slm {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `slm info | head` closed the pipe: stop quietly, as other shell tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush does not raise
        return 141
    except OSError as e:
        if e.errno not in USER_OS_ERRORS:
            raise
        print(f"slm {args.command}: error: {os_error_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
