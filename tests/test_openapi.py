"""schemathesis against the server's own OpenAPI document: generated requests (valid and invalid) to every
operation must get no 5xx, and every response must match what the document says (status code, content
type, headers, body schema). Bounded: a fixed seed and a fixed number of examples per operation."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import server

CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,"
          "response_schema_conformance")


@pytest.mark.slow
def test_the_api_does_what_its_openapi_document_says(trained, tmp_path):
    # Small generations keep each example quick; everything else is the server's default.
    with server(trained, max_new_tokens=16) as url:
        schemathesis = Path(sys.executable).with_name("schemathesis")
        r = subprocess.run([str(schemathesis), "run", f"{url}/openapi.json", "--checks", CHECKS, "--seed", "0",
                            "--max-examples", "25", "--workers", "1", "--no-color", "--generation-database", "none",
                            "--request-timeout", "60", "--phases", "examples,coverage,fuzzing"],
                           capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    tested = re.search(r"(\d+) selected", r.stdout)
    assert tested and int(tested.group(1)) >= 9, r.stdout[-2000:]  # every operation, none filtered away
