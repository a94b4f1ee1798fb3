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


def test_functions_are_short_and_long_classes_say_why():
    """The size rules of docs/design.md: no function or method in src/ over 60 lines; a class over 150 lines
    says in its docstring why it is one class ("One class of ~N lines ...")."""
    import ast

    too_long = []
    for path in sorted((ROOT / "src" / "slm").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            size = node.end_lineno - node.lineno + 1 if hasattr(node, "end_lineno") else 0
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and size > 60:
                too_long.append(f"{path.name}: {node.name} is {size} lines")
            if isinstance(node, ast.ClassDef) and size > 150 and "One class of" not in (ast.get_docstring(node) or ""):
                too_long.append(f"{path.name}: class {node.name} is {size} lines and its docstring does not say why")
    assert not too_long, too_long
