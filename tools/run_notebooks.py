"""Re-run the notebooks top to bottom and save them with their new outputs (`make notebooks`).

Full mode (not the tests' SLM_QUICK): the outputs a reader sees on GitHub come from the bundled model as it is now.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def run(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    nbformat.write(nb, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", default=sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
    for name in ap.parse_args().names:
        start = time.time()
        run(NOTEBOOKS / name)
        print(f"{name}: {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
