"""Peak memory of `slm prepare` on single-line text files (no newline at all) of growing size.

Each size is a file of random words from a 5,000-word list, prepared in a fresh `slm prepare` process whose
peak resident memory is read from the kernel (wait4's ru_maxrss). A tokenizer is trained on each file
(--vocab-size 512), so both the BPE trainer and the encoder see the whole text.

    python benchmarks/prepare_memory.py --sizes 10,50,200 --json benchmarks/prepare-memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from slm.cpu import cpu_info


def write_one_line(path: Path, megabytes: int, seed: int = 0) -> None:
    """A text file of ``megabytes`` MB of words separated by single spaces, with no line break."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(5000)]
    with open(path, "w", encoding="ascii") as f:
        written = 0
        while written < megabytes * 1_000_000:
            chunk = " ".join(rng.choices(words, k=10_000)) + " "
            f.write(chunk)
            written += len(chunk)


def prepare_peak(text: Path, out: Path) -> tuple[float, float]:
    """(peak resident MiB, seconds) of one `slm prepare` process."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "slm.cli", "prepare", str(text), "--out", str(out),
                             "--vocab-size", "512", "--quiet"], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"slm prepare failed on {text}")
    return usage.ru_maxrss / 1024, time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10,50,200", help="file sizes in MB")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in (int(x) for x in args.sizes.split(",")):
            text = Path(tmp) / f"one-line-{size}mb.txt"
            write_one_line(text, size)
            peak, seconds = prepare_peak(text, Path(tmp) / f"out-{size}")
            rows.append({"megabytes": size, "peak_rss_mib": round(peak), "seconds": round(seconds, 1)})
            print(f"{size:>5} MB one-line file: peak {peak:,.0f} MiB, {seconds:.1f} s", flush=True)
            text.unlink()
    info = cpu_info()
    result = {"cpu": f"{info.model} ({' '.join(info.features)})", "threads": info.threads, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
