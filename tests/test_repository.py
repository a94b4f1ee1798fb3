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


def test_long_modules_say_why():
    """A module of src/slm over ~400 lines says in its docstring why it is one module ("One module of ~N lines")."""
    import ast

    long = [f"{path.relative_to(ROOT)}: {n} lines" for path in sorted((ROOT / "src" / "slm").rglob("*.py"))
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > 420
            and "One module of" not in (ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or "")]
    assert not long, long


def slm_imports(path) -> set[str]:
    """The slm modules a module imports, at its top or inside a function (not under TYPE_CHECKING)."""
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(
        node.test) for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("slm"):
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("slm")}
    return found


def import_graph() -> dict[str, set[str]]:
    src = ROOT / "src"
    modules = {".".join(p.relative_to(src).with_suffix("").parts).removesuffix(".__init__"): p
               for p in (src / "slm").rglob("*.py")}
    return {name: {m for m in slm_imports(path) if m in modules and m != name} for name, path in modules.items()}


def test_imports_flow_one_way():
    """No cycle among slm's modules: each can be read (and tested) after the ones it imports."""
    graph, order, state = import_graph(), [], {}

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == "done":
            return
        assert state.get(name) != "open", "import cycle: " + " -> ".join([*path, name])
        state[name] = "open"
        for imported in sorted(graph[name]):
            visit(imported, [*path, name])
        state[name] = "done"
        order.append(name)

    for name in sorted(graph):
        visit(name, [])
    assert len(order) == len(graph)
    assert "slm.model" not in graph["slm.native"]  # GPT is an annotation there: the cycle model -> ... -> native


# Every module of slm imported with the process's reads of /proc/cpuinfo recorded: importing reads no hardware.
IMPORT_ALL = """
import builtins, io, json, pathlib, sys
reads = []
real_open = io.open
def watched(file, *args, **kwargs):
    if str(file) == "/proc/cpuinfo":
        reads.append("".join(__import__("traceback").format_stack(limit=6)))
    return real_open(file, *args, **kwargs)
builtins.open = io.open = watched
import importlib
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps(reads))
"""


def test_importing_any_module_reads_no_hardware():
    import json
    import sys

    modules = sorted(name for name in import_graph() if name != "slm.ui.app")  # streamlit runs that one
    out = subprocess.run([sys.executable, "-c", IMPORT_ALL, *modules], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    reads = json.loads(out.stdout.splitlines()[-1])
    assert not reads, reads[0]


# A figure dated by the numbered work period it was measured in (the word for one, then its number; or "this"
# and the word) means nothing to a reader: the tree names a date or a commit instead.
WORK_PERIOD = re.compile(r"\bsessions?\s+\d+|\b(?:this|that|next|earlier|previous|one)\s+session\b|\bsession-\d+",
                         re.IGNORECASE)


def test_no_figure_is_dated_by_a_numbered_work_period():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    found = []
    for name in files:
        path = ROOT / name
        if path.suffix in (".png", ".safetensors", ".bin") or name.endswith("tokenizer.json") or not path.is_file():
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="ignore").splitlines(), 1):
            if WORK_PERIOD.search(line):
                found.append(f"{name}:{number}: {line.strip()[:100]}")
    assert not found, "\n".join(found)


def imported_by(name: str, graph: dict[str, set[str]]) -> set[str]:
    """Every slm module ``name`` imports, directly or through others."""
    seen, todo = set(), [name]
    while todo:
        for module in graph[todo.pop()] - seen:
            seen.add(module)
            todo.append(module)
    return seen


def test_the_model_knows_no_files_and_the_server_no_training():
    """docs/design.md's data flow: the model imports nothing that reads files or tokenizes, the server nothing
    of preparing data or training."""
    graph = import_graph()
    files = {"slm.checkpoint", "slm.files", "slm.corpus", "slm.data", "slm.prepare", "slm.tokenizer", "slm.outputs"}
    assert not imported_by("slm.model", graph) & files
    training = {"slm.train", "slm.train_config", "slm.machine", "slm.finetune", "slm.reporting", "slm.run_dir",
                "slm.optim", "slm.data", "slm.prepare"}
    assert not imported_by("slm.server.app", graph) & training
