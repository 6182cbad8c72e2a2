"""The process-wide CPU settings the commands make (drip_cli.runtime)."""

import ctypes.util
import subprocess
import sys

import pytest
import torch

from drip_cli.runtime import configure_cpu

# Tensors of 0.25-16 MiB allocated in random order, up to 7 alive, as a solver's temporaries
# are; prints the page faults of the rounds after the first two (the heap's warm-up).
WORKLOAD = """
import random, resource, sys, torch
from drip_cli.runtime import configure_cpu
if sys.argv[1] == "configured":
    configure_cpu()
rng, faults = random.Random(0), 0
for round in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    held = []
    for _ in range(200):
        held.append(torch.ones(rng.randint(2**16, 2**22)))
        if len(held) > 6:
            held.pop(rng.randrange(len(held)))
    del held
    if round >= 2:
        faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(faults)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", WORKLOAD, mode], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux")
                    or "musl" in (ctypes.util.find_library("c") or ""),
                    reason="the allocator setting is for glibc on Linux")
def test_configured_allocator_reuses_freed_memory():
    """With glibc's defaults, freed blocks of a few MiB go back to the system and their pages
    fault in again when the next tensor takes them; after configure_cpu they are reused."""
    default, configured = _faults("default"), _faults("configured")
    assert default > 4096 and configured < default / 4, (default, configured)


def test_configure_cpu_is_idempotent_and_flushes_denormals():
    configure_cpu()
    configure_cpu()
    tiny = torch.tensor([1e-39], dtype=torch.float32)   # a float32 denormal
    assert float(tiny * 1) == 0.0
