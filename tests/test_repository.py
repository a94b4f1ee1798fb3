"""The repository itself: no address of a package registry (the machine's own pip and apt configuration
says where packages come from), and no web address except the few the project means."""

from __future__ import annotations

import re
import subprocess

from conftest import ROOT

ALLOWED = ("http://127.0.0.1", "http://localhost", "https://localhost", "http://api:8000",  # our own servers
           "http://{", "http://evil.example",  # a template; a CORS test origin (.example is reserved)
           "https://github.com/EleutherAI/lm-evaluation-harness")  # a citation


def test_no_registry_or_other_web_address_is_written_down():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    found = []
    for name in files:
        path = ROOT / name
        if path.suffix in (".png", ".safetensors", ".bin") or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="ignore")
        found += [f"{name}: {url}" for url in re.findall(r"https?://[^\s'\"<>)`]+", text)
                  if not url.startswith(ALLOWED)]
    assert not found, "\n".join(found)
