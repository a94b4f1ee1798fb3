"""`make demo`: start the API and the UI with the bundled model, print the URLs, stop both on Ctrl-C."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request


def wait_healthy(url: str, proc: subprocess.Popen, seconds: float = 120) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            time.sleep(0.5)
    return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=os.environ.get("SLM_MODEL", "default"))
    parser.add_argument("--api-port", type=int, default=8000)
    parser.add_argument("--ui-port", type=int, default=8501)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    # Ctrl-C and SIGTERM both stop the pair (a shell may have started us with SIGINT ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    api_url = f"http://{args.host}:{args.api_port}"
    slm = [sys.executable, "-m", "slm.cli"]
    api = subprocess.Popen([*slm, "serve", "--model", args.model, "--host", args.host, "--port", str(args.api_port)])
    procs = [api]
    try:
        if not wait_healthy(f"{api_url}/health", api):
            print("the API did not become healthy; see its log above", file=sys.stderr)
            return 1
        ui = subprocess.Popen([*slm, "ui", "--host", args.host, "--port", str(args.ui_port), "--api-url", api_url])
        procs.append(ui)
        if not wait_healthy(f"http://{args.host}:{args.ui_port}/_stcore/health", ui):
            print("the UI did not start; see its log above", file=sys.stderr)
            return 1
        print(f"\n  API: {api_url}/docs\n  UI:  http://{args.host}:{args.ui_port}\n\n  Ctrl-C stops both.\n",
              flush=True)
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    sys.exit(main())
