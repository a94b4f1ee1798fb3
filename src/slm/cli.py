"""The `slm` command. Each subcommand parses its flags and calls the module that does the work.

User mistakes (missing files, bad settings) raise ValueError subclasses; they are printed as one line
and exit with status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from slm.config import PRESETS


def _presets_help() -> str:
    lines = ["presets (parameters):"]
    for name, p in PRESETS.items():
        lines.append(f"  {name:<10} {p.config.num_parameters():>11,}  {p.description}")
    return "\n".join(lines)


# ---- subcommands ----------------------------------------------------------------------------------------
def machine_report() -> list[str]:
    """What this machine is and what `auto` picks on it, for training and for decoding."""
    import torch

    from slm import native
    from slm.cpu import BF16_MIN_SPEEDUP, FEATURES, bf16_speedup, cpu_info

    info = cpu_info()
    speedup = bf16_speedup()
    missing = [f for f in FEATURES if f not in info.features]
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (training and serving run on the CPU)"
    bf16 = speedup >= BF16_MIN_SPEEDUP
    compiler = native.library() is not None
    return [
        f"CPU: {info.model} ({info.logical_cpus} logical CPUs; torch uses {info.threads} threads)",
        f"features: {' '.join(info.features) or '-'}" + (f" (not: {' '.join(missing)})" if missing else ""),
        f"bf16 matrix products: {speedup:.2f}x the speed of fp32 here (measured once, cached)",
        f"train --dtype auto: {'bf16 autocast' if bf16 else 'fp32'} (bf16 needs >= {BF16_MIN_SPEEDUP:g}x); "
        f"Muon's iteration: {'bf16' if bf16 else 'fp32'}",
        "decoding: " + ("the native C step (fp32 weights; --decode-weights fp16 for the fp16 copies)" if compiler and
                        native.enabled() else "the PyTorch step (" + ("SLM_NATIVE=0" if not native.enabled()
                                                                    else "no C compiler found") + ")"),
        f"GPU: {gpu}",
    ]


def cmd_info(args: argparse.Namespace) -> int:
    print("\n".join(machine_report()) + "\n")
    print(_presets_help())
    for name, p in PRESETS.items():
        if p.why:
            print(f"\nwhy {name}: {p.why}")
        if p.training:
            recipe = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in p.training.items())
            print(f"  trains by default with: {recipe}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from slm.data import prepare

    meta = prepare(args.inputs, args.out, vocab_size=args.vocab_size, tokenizer=args.tokenizer,
                   val_fraction=args.val_fraction, seed=args.seed, text_field=args.text_field,
                   hf_dataset=args.hf_dataset, progress=not args.quiet, split=args.split, instruct=args.instruct)
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


MODEL_FLAGS = {
    "arch": (str, "gpt2 | llama"), "n_layer": (int, "transformer blocks"), "n_head": (int, "attention heads"),
    "n_kv_head": (int, "llama: key/value heads (grouped-query attention)"), "d_model": (int, "model width"),
    "mlp_hidden": (int, "llama: SwiGLU hidden size"), "context_length": (int, "tokens of context"),
    "rope_theta": (float, "llama: rotary base"), "dropout": (float, "dropout"),
}


def cmd_train(args: argparse.Namespace) -> int:
    import dataclasses

    from slm.train import TrainConfig, TrainError, load_config_file, resume_settings, settings_under_flags, train

    # The saved run's settings (with --resume), then the config file, then flags: each overrides the last.
    values, model_overrides = resume_settings(args.out) if args.resume else ({}, {})
    if args.config:
        file_values, file_model = load_config_file(args.config)
        values, model_overrides = {**values, **file_values}, {**model_overrides, **file_model}
    for f in dataclasses.fields(TrainConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    for key in MODEL_FLAGS:
        if getattr(args, key) is not None:
            model_overrides[key] = getattr(args, key)
    if args.init_from and args.preset:
        raise TrainError(f"--init-from {args.init_from} keeps that model's shape; drop --preset {args.preset}")
    cfg = TrainConfig(**{**settings_under_flags(values), **values})
    result = train(args.data, args.out, cfg, model_overrides, resume=args.resume, progress=not args.quiet)
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
    prompt = (header(request) if request else "") + args.prompt
    if not prompt:
        raise InstructError("--prompt is empty: give some text to continue, or --words for a story")
    return prompt, request.words


def cmd_generate(args: argparse.Namespace) -> int:
    from slm.generation import Engine, SamplingParams, raise_failed
    from slm.instruct import used_words

    prompt, words = story_prompt(args)
    params = SamplingParams(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                            tuple(args.stop or ()), frequency_penalty=args.frequency_penalty,
                            presence_penalty=args.presence_penalty, repetition_penalty=args.repetition_penalty,
                            min_p=args.min_p)
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
    while not seq.finished:
        engine.step()
        raise_failed([seq])
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
    from slm.export import export_hf

    model, tokenizer = _load_model(args.model)
    export_hf(model, args.out, tokenizer)
    kind = "LlamaForCausalLM" if model.config.arch == "llama" else "GPT2LMHeadModel"
    print(f"wrote a {kind} directory to {args.out}")
    return 0


def cmd_export_gguf(args: argparse.Namespace) -> int:
    from slm.gguf_export import export_gguf

    model, tokenizer = _load_model(args.model)
    path = export_gguf(model, tokenizer, args.out, args.dtype, name=Path(str(args.model)).name)
    print(f"wrote {path} ({model.config.arch}, {args.dtype}, {path.stat().st_size:,} bytes)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from slm.server.app import run_server

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
def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=os.environ.get("SLM_MODEL", "default"),
                   help="checkpoint directory, or 'default' for the bundled model (env SLM_MODEL)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slm", description="A small GPT: prepare data, train, generate, serve.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_presets_help())
    parser.add_argument("--version", action="version", version=f"slm {__import__('slm').__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="this machine (CPU, features, what auto picks) and the model presets")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("prepare", help="corpus -> tokenizer + train.bin/val.bin")
    p.add_argument("inputs", nargs="*", help=".txt/.md files, directories, .jsonl(.gz), .parquet")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary to train (default 8192)")
    p.add_argument("--tokenizer", help="reuse a tokenizer: a model ('default', a checkpoint or run directory), a "
                   "tokenizer.json, or 'gpt2'; use the model's own to fine-tune it (slm train --init-from)")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share held out for validation")
    p.add_argument("--split", default="auto", choices=["auto", "documents", "tail"],
                   help="validation by whole documents, or the tail of each document (auto: documents when "
                        "there are enough of them)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/validation split")
    p.add_argument("--text-field", default="text", help="JSONL/parquet field holding the text")
    p.add_argument("--hf-dataset", help="also stream this Hugging Face dataset (needs `datasets` + network)")
    p.add_argument("--instruct", default="", metavar="NAMES",
                   help="also write these inputs (file name starts, e.g. tinystories,fables) as stories that follow "
                   "a request ('Words: ... / Features: ... / Story:'), as inputs named instruct:FILE for --mix")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train a model on a prepared data directory",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_presets_help())
    p.add_argument("--data", required=True, help="directory written by `slm prepare`")
    p.add_argument("--out", required=True, help="run directory (best/, last/, metrics.jsonl, loss.png)")
    p.add_argument("--preset", help="model preset (default slm-16m)")
    p.add_argument("--config", help="TOML file of training settings and a [model] table")
    p.add_argument("--init-from", metavar="MODEL", default=None,
                   help="fine-tune: start from this model's weights and shape (a checkpoint or run directory, or "
                   "'default'), with a new optimizer and schedule; the data must use its tokenizer "
                   "(slm prepare --tokenizer MODEL)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from last/ with the settings it was saved with (flags given now "
                   "override them; --max-minutes is per leg)")
    for flag, typ, what in [
        ("--max-steps", int, "optimizer steps"), ("--batch-size", int, "sequences per micro-batch per process"),
        ("--grad-accum", int, "micro-batches per step"), ("--lr", float, "peak learning rate"),
        ("--min-lr-ratio", float, "final lr / peak lr"), ("--warmup-steps", int, "linear warmup steps"),
        ("--weight-decay", float, "AdamW weight decay"), ("--grad-clip", float, "gradient norm clip (0 = off)"),
        ("--eval-interval", int, "steps between evaluations"), ("--eval-windows", int, "validation windows"),
        ("--log-interval", int, "steps between log lines"), ("--seed", int, "random seed"),
        ("--device", str, "auto | cpu | cuda | mps"), ("--dtype", str, "auto | fp32 | bf16 (autocast)"),
        ("--threads", int, "torch CPU threads"), ("--max-minutes", float, "stop and save after this wall time"),
        ("--optimizer", str, "adamw | muon (Muon for the blocks' matrices, AdamW for the rest)"),
        ("--muon-lr", float, "Muon's peak learning rate (default 0.02)"),
        ("--muon-momentum", float, "Muon's momentum (default 0.95)"),
        ("--mix", str, "sample inputs by weight, e.g. simple-stories=3,fables=2 (names start input file names)"),
        ("--loss-on", str, "all | story: 'story' leaves the instruct headers (slm prepare --instruct) out of the "
         "loss"),
    ]:
        p.add_argument(flag, type=typ, default=None, help=what)
    shape = p.add_argument_group("model shape (overrides the preset; recorded in the run's config.json)")
    for key, (typ, what) in MODEL_FLAGS.items():
        shape.add_argument("--" + key.replace("_", "-"), type=typ, default=None, help=what)
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar or log lines (metrics.jsonl still records every figure)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="continue a prompt",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_presets_help())
    _model_arg(p)
    p.add_argument("--prompt", default="", help="text to continue (with --words: the story's first words)")
    p.add_argument("--words", metavar="A,B,C", help="ask for a story that uses these words (at most 8; for models "
                   "trained with `slm prepare --instruct`); the prompt shown starts with the request")
    p.add_argument("--features", metavar="F", help="with --words: features the story should have (dialogue)")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None, help="keep tokens with p >= MIN_P x the top token's")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="> 1 discourages tokens already in the prompt or output (transformers' definition)")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="-2..2, OpenAI's definition")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="-2..2, OpenAI's definition")
    p.add_argument("--seed", type=int, default=None, help="same seed, same text")
    p.add_argument("--stop", action="append", help="stop before this string (repeatable)")
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the whole window every token")
    p.add_argument("--decode-weights", choices=["fp32", "fp16"], default="fp32",
                   help="fp16: the native decode step reads fp16 copies of the matrices (faster, not bit-exact)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--json", action="store_true", help="print text, token counts, seconds and tokens/s as JSON")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="loss, perplexity and bits per byte on text files")
    _model_arg(p)
    p.add_argument("files", nargs="+", help="text files (.txt, .md, .jsonl, .jsonl.gz, .parquet)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--stride", type=int, default=None, help="sliding-window stride (default context/2)")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="decode speed: KV cache vs none vs transformers vs llama.cpp")
    p.add_argument("--model", default=None, help="checkpoint directory or 'default' (else random weights)")
    p.add_argument("--preset", default="slm-16m", help="shape for random weights when no --model")
    p.add_argument("--lengths", default="64,128,256,512")
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement (median)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dtype", default="fp32", help="fp32 | bf16 | fp16 weights for our engine")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    p.add_argument("--text", help="a text file to measure the fp16 weights' bits-per-byte change on (its first "
                   "4096 tokens; else the fp32 greedy tokens, in bits per token)")
    p.add_argument("--no-llama-cpp", action="store_true",
                   help="skip llama.cpp's columns (otherwise added when `make llama-cpp` has built its tools)")
    p.add_argument("--json", help="write the figures to this JSON file")
    p.add_argument("--plot", help="write a PNG of tokens/s against length")
    p.set_defaults(func=cmd_bench)

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

    p = sub.add_parser("export-hf", help="write a Hugging Face directory (GPT2LMHeadModel or LlamaForCausalLM)")
    _model_arg(p)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("export-gguf", help="write a GGUF file for llama.cpp and ollama")
    _model_arg(p)
    p.add_argument("--out", required=True, help="the .gguf file to write")
    p.add_argument("--dtype", default="f32", choices=["f32", "f16"], help="matrices in f32 or f16")
    p.set_defaults(func=cmd_export_gguf)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:  # our errors (and bad numbers) are user mistakes: one line, no traceback
        print(f"slm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"slm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"slm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
