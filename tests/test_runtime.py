"""The process-wide CPU settings the commands make (drip_cli.runtime)."""

import ctypes.util
import subprocess
import sys

import pytest
import torch

from drip_cli.runtime import configure_cpu

# Holds 12 tensors of 8 MiB, frees them, and prints how much of the 96 MiB the process gave
# back to the system (resident memory before and after the free, from /proc).
WORKLOAD = """
import sys, torch
from drip_cli.runtime import configure_cpu
if sys.argv[1] == "configured":
    configure_cpu()
def resident():
    return int(open("/proc/self/statm").read().split()[1])
held = [torch.ones(2 * 2**20) for _ in range(12)]
before = resident()
del held
print((before - resident()) * 4096 / 2**20)
"""


def _released_mib(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", WORKLOAD, mode], capture_output=True, text=True,
                         check=True)
    return float(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux")
                    or "musl" in (ctypes.util.find_library("c") or ""),
                    reason="the allocator setting is for glibc on Linux")
def test_configured_allocator_keeps_freed_memory():
    """With glibc's defaults, freed blocks of a few MiB go back to the system at once (and the
    next tensor's pages fault in again); after configure_cpu the heap keeps them for reuse.
    (Counting page faults instead was not reliable: transparent huge pages change the count.)"""
    default, configured = _released_mib("default"), _released_mib("configured")
    assert default > 80 and configured < 8, (default, configured)


def test_configure_cpu_is_idempotent_and_flushes_denormals():
    configure_cpu()
    configure_cpu()
    tiny = torch.tensor([1e-39], dtype=torch.float32)   # a float32 denormal
    assert float(tiny * 1) == 0.0
