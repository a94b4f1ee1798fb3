"""Print the Debian mirror this machine's apt uses for a release (default bookworm), for debootstrap.

    python3 docker/debian_mirror.py [SUITE]

Reads /etc/apt/sources.list (one-line format) and /etc/apt/sources.list.d/*.list and *.sources (deb822), and
prints the first URI whose entry carries SUITE with the `main` component, so a machine behind a local
mirror or proxy builds the base image from the same place its apt does. Exits 1 if there is none.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

APT = Path("/etc/apt")


def one_line_entries(text: str):
    for line in text.splitlines():
        line = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
        if len(line) >= 4 and line[0] == "deb":
            yield [line[1]], [line[2]], line[3:]


def deb822_entries(text: str):
    for stanza in re.split(r"\n\s*\n", text):
        fields = {}
        for line in stanza.splitlines():
            if line and not line.startswith("#") and ":" in line:
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.split()
        if "deb" in fields.get("types", []) and fields.get("enabled", ["yes"])[0] != "no":
            yield fields.get("uris", []), fields.get("suites", []), fields.get("components", [])


def mirrors(suite: str) -> list[str]:
    found = []
    for path in [APT / "sources.list", *sorted((APT / "sources.list.d").glob("*.list"))]:
        if path.is_file():
            found += [u for uris, suites, comps in one_line_entries(path.read_text()) if suite in suites
                      and "main" in comps for u in uris]
    for path in sorted((APT / "sources.list.d").glob("*.sources")):
        found += [u for uris, suites, comps in deb822_entries(path.read_text()) if suite in suites
                  and "main" in comps for u in uris]
    return found


if __name__ == "__main__":
    found = mirrors(sys.argv[1] if len(sys.argv) > 1 else "bookworm")
    if not found:
        sys.exit("no apt source for this release: add one, or set DEBIAN_MIRROR")
    print(found[0])
