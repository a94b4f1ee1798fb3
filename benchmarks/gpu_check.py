"""The GPU check: on one NVIDIA GPU, train, generate, bench and serve, and write the figures down.

    python benchmarks/gpu_check.py OUT_DIR [--dry-run] [--train-minutes 2]

Run by benchmarks/gpu_check.sh (which installs the project first). Steps, each timed and recorded:
a corpus the script writes itself (the tests' story generator; no data travels to the GPU machine), `slm
prepare`, `slm train` of cpu-7m and llama-16m for --train-minutes each (bf16 autocast + torch.compile, on
cuda), greedy generation on the GPU with and without the KV cache (their tokens must be equal), `slm
bench` on the trained 7M model, and an `slm serve` smoke test (one completion over HTTP). Writes
OUT_DIR/gpu-check.json and OUT_DIR/loss-<preset>.png. ``--dry-run`` runs the same steps on the CPU with the
tiny presets, a few steps and fp32, so the test suite keeps this script working where no GPU is.
Exits 1 if a step failed (the JSON says which, and why).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

from common import slm_server, write_stories

ROOT = Path(__file__).resolve().parents[1]


def slm(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slm.cli", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def checked(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(r.args[3:])}: exit {r.returncode}: {(r.stderr or r.stdout)[-2000:]}")
    return r


def environment() -> dict:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    smi = shutil.which("nvidia-smi")
    driver = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                            text=True).stdout.strip() if smi else None
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": gpu, "driver": driver, "cpu_count": os.cpu_count()}


def prepare_data(work: Path, dry: bool) -> Path:
    corpus = write_stories(work / "corpus", n_docs=400 if dry else 20_000, seed=0)
    checked(slm("prepare", str(corpus), "--out", str(work / "data"), "--vocab-size", "512" if dry else "4096",
                "--val-fraction", "0.05", "--quiet", timeout=600))
    return work / "data"


def train_run(data: Path, out: Path, preset: str, dry: bool, minutes: float) -> dict:
    args = ["train", "--data", str(data), "--out", str(out), "--preset", preset, "--quiet", "--eval-windows", "16"]
    if dry:
        args += ["--device", "cpu", "--dtype", "fp32", "--max-steps", "4", "--eval-interval", "2",
                 "--log-interval", "1", "--batch-size", "4"]
    else:
        args += ["--device", "cuda", "--dtype", "bf16", "--compile", "--max-minutes", str(minutes),
                 "--max-steps", "100000", "--eval-interval", "200", "--log-interval", "20"]
    started = time.perf_counter()
    checked(slm(*args, timeout=60 * (minutes + 4)))
    summary = json.loads((out / "summary.json").read_text())
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in logs if m["kind"] == "train"]
    steady = train[len(train) // 2:] or train  # past compilation and warm-up
    return {"preset": preset, "parameters": summary["parameters"], "steps": summary["steps"],
            "tokens": summary["tokens_seen"], "wall_s": round(time.perf_counter() - started, 1),
            "train_s": summary["wall_time_s"],
            "tokens_per_s_steady": round(sum(m["tokens_per_s"] for m in steady) / len(steady), 1),
            "first_log_elapsed_s": train[0]["elapsed"], "final_train_loss": train[-1]["loss"],
            "best_val_bpb": summary["best_val_bpb"], "hardware": summary["hardware"],
            "loss_curve": [[m["step"], round(m["loss"], 4)] for m in train]}


def generation(model_dir: Path, dry: bool) -> dict:
    import torch

    from slm.checkpoint import load
    from slm.generation import Engine, SamplingParams

    device = "cpu" if dry else "cuda"
    model, tokenizer = load(model_dir)
    model = model.to(device).eval()
    prompt = tokenizer.encode("Once upon a time there was a little fox named Tom.")
    n = 32 if dry else 512  # past the tiny context in the dry run, past the 7M's 512 on the GPU
    out = {}
    for cached in (True, False):
        engine = Engine(model, tokenizer, max_batch=1, use_cache=cached)
        seq = engine.add(prompt, SamplingParams(max_new_tokens=n, temperature=0, stop_at_eot=False))
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        while engine.active:
            engine.step()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        out["cached" if cached else "uncached"] = {"tokens": seq.generated, "tokens_per_s": round(n / seconds, 1)}
    return {"device": device, "new_tokens": n, "greedy_equal": out["cached"]["tokens"] == out["uncached"]["tokens"],
            "cached_tokens_per_s": out["cached"]["tokens_per_s"],
            "uncached_tokens_per_s": out["uncached"]["tokens_per_s"]}


def bench(model_dir: Path, work: Path, dry: bool) -> dict:
    path = work / "bench.json"
    checked(slm("bench", "--model", str(model_dir), "--lengths", "16" if dry else "64,256", "--repeats", "1",
                "--no-llama-cpp", *(["--no-hf"] if dry else []), "--json", str(path), timeout=900))
    return json.loads(path.read_text())


def serve_smoke(model_dir: Path) -> dict:
    import httpx

    with slm_server(model_dir, threads=1) as url:
        started = time.perf_counter()
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 32,
                                                      "temperature": 0, "ignore_eos": True}, timeout=120)
        seconds = time.perf_counter() - started
        health = httpx.get(f"{url}/health").json()
    r.raise_for_status()
    return {"status": r.status_code, "completion_tokens": r.json()["usage"]["completion_tokens"],
            "seconds": round(seconds, 3), "health": health["status"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--dry-run", action="store_true", help="on the CPU, tiny presets, a few steps")
    parser.add_argument("--train-minutes", type=float, default=2.0)
    args = parser.parse_args()
    out = Path(args.out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    presets = ("tiny", "tiny-llama") if args.dry_run else ("cpu-7m", "llama-16m")
    report: dict = {"dry_run": args.dry_run, "steps": {}, "failed": []}
    started = time.perf_counter()

    def step(name: str, fn, *fn_args):
        t = time.perf_counter()
        try:
            report["steps"][name] = {"result": fn(*fn_args)}
        except Exception as e:  # record and go on: one failed step should not hide the others' figures
            report["steps"][name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
            report["failed"].append(name)
        report["steps"][name]["seconds"] = round(time.perf_counter() - t, 1)
        print(f"{name}: {'failed' if name in report['failed'] else 'ok'} ({report['steps'][name]['seconds']} s)",
              flush=True)
        return report["steps"][name].get("result")

    report["environment"] = step("environment", environment)
    data = step("prepare", prepare_data, work, args.dry_run)
    for preset in presets:
        if data is not None:
            step(f"train-{preset}", train_run, data, work / preset, preset, args.dry_run, args.train_minutes)
            if (work / preset / "loss.png").exists():
                shutil.copy(work / preset / "loss.png", out / f"loss-{preset}.png")
    model = work / presets[0] / "best"
    if model.is_dir():
        step("generate", generation, model, args.dry_run)
        step("bench", bench, model, work, args.dry_run)
        step("serve", serve_smoke, model)
    else:
        report["failed"].append("no trained model to generate, bench and serve with")
    report["total_s"] = round(time.perf_counter() - started, 1)
    (out / "gpu-check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    shutil.rmtree(work, ignore_errors=True)  # data, checkpoints: only the figures and curves come back
    print(f"wrote {out / 'gpu-check.json'} in {report['total_s']} s; failed: {report['failed'] or 'none'}")
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
