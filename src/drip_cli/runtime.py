"""Process-wide CPU settings that the commands make before any heavy work
(:func:`drip_cli.reconstruct.resolve_device` calls :func:`configure_cpu`).

* Denormal numbers are flushed to zero: the squared filter responses of flat image regions fall
  below 1e-38 in float32, and arithmetic on them was 5x slower (37 against 7 ms for one square of
  the responses of 64 images); no result changes.
* glibc's allocator keeps freed memory for reuse (Linux only). The solvers allocate a fresh
  tensor of a few MiB for almost every operation; by default glibc serves a block that large by
  ``mmap`` or hands the top of its heap back to the system as soon as it is freed, so each new
  tensor's pages fault in again, zero-filled. On the tomography sample model (64 crops of 64x64,
  2 threads) a DRIP solve made 0.4-2.4 million page faults in nine runs; in two of them 2.2 and
  2.4 million, with 5.7-6.1 s of their 43-45 CPU seconds spent in the kernel. With blocks up to
  ``MMAP_THRESHOLD`` served from the heap and up to ``TRIM_THRESHOLD`` of free heap kept, it
  made 12-31 thousand, and the two runs paired with those took 34 CPU seconds in all (converged
  TV, which allocates less: 36-45 against 34). The cost is that a process keeps up to
  ``TRIM_THRESHOLD`` of freed memory until it exits; its peak moved by a few MiB (``make
  bench``'s memory section: 337-342 and 355 MiB against 333-334 and 357). The faults also
  mislead the timing that picks each convolution's CPU kernel
  (:mod:`drip_cli.operators.convolution`): the depthwise kernel's temporaries are large, and
  without these settings an AMD EPYC machine timed it at 10-13 ms against
  ``conv_transpose2d``'s 4-5 ms for the tomography sample model's filters at dilation 2 (32
  samples), and at 1.9-3.1 ms where the heap kept freed memory (these settings, or larger
  blocks freed earlier in the process). The model's solve of 64 crops then took 26.2-29.5 s
  against 18.4-21.4 s with the allocator settings (given as glibc's environment variables;
  session 67, /tmp scripts).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import torch

# mallopt parameters (glibc's malloc.h) and the values set
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 * 2**20    # glibc's largest dynamic threshold on 64-bit systems
TRIM_THRESHOLD = 256 * 2**20

_configured = False


def configure_cpu() -> None:
    """Flush denormals and tune glibc's allocator (see the module docstring); idempotent, and a
    no-op for the allocator where the C library is not glibc."""
    global _configured
    torch.set_flush_denormal(True)
    if _configured:
        return
    _configured = True
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):   # not glibc (musl has no mallopt)
        return
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
