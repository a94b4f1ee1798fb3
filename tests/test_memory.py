"""slm.memory: glibc's malloc set for training (keep freed memory) and for serving (hand big buffers back)."""

from __future__ import annotations

import subprocess
import sys

MEMORY_KEPT_AFTER_FREE = """
import os, sys
import torch
from slm.memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def resident_mb():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
before = resident_mb()
block = torch.empty(128 * 2**20, dtype=torch.uint8).fill_(1)  # a block the size of a step's logits
used = resident_mb()
del block
print(used - before, resident_mb() - before)
"""


def test_slm_train_keeps_freed_memory_for_the_next_step():
    """glibc hands a block above 32 MB back to the kernel when it is freed, so the next step's faults its pages
    in again (35,000-190,000 faults a step for cpu-7m); after keep_freed_memory(), what `slm train` calls, the
    process keeps it for reuse."""
    mb = {}
    for how in ("default", "keep"):
        out = subprocess.run([sys.executable, "-c", MEMORY_KEPT_AFTER_FREE, how], check=True, capture_output=True,
                             text=True).stdout.split()
        mb[how] = [float(v) for v in out]  # resident MB above the start: while the block is used, after it is freed
    assert mb["default"][0] > 120 and mb["default"][1] < 20, mb
    assert mb["keep"][0] > 120 and mb["keep"][1] > 120, mb


MEMORY_KEPT_AFTER_A_LONG_REQUEST = """
import os, sys
import torch
from slm.memory import return_large_buffers_to_the_system
if sys.argv[1] == "serve":
    assert return_large_buffers_to_the_system()
def resident_mb():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
first = torch.empty(30 * 2**20, dtype=torch.uint8).fill_(1)
del first  # glibc's defaults now raise the mmap threshold to 30 MB
before = resident_mb()
logits = torch.empty(16 * 2**20, dtype=torch.uint8).fill_(1)  # a long prefill's logits, then freed
del logits
print(resident_mb() - before)
"""


def test_the_server_hands_a_long_requests_buffers_back():
    """Under glibc's defaults a freed 30 MB block raises the mmap threshold, so the next 16 MB of logits come from
    the heap and stay in the process after they are freed; the server's setting hands them back."""
    kept = {how: float(subprocess.run([sys.executable, "-c", MEMORY_KEPT_AFTER_A_LONG_REQUEST, how], check=True,
                                      capture_output=True, text=True).stdout) for how in ("default", "serve")}
    assert kept["default"] > 14 and kept["serve"] < 2, kept
