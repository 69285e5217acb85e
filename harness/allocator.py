"""The C allocator on Linux: freed memory is kept for the next step instead of being handed back to the system. A
reader of the method may skip this file: it holds no rule of the paper.

glibc's malloc serves each large tensor with its own mmap and unmaps it when the tensor is freed, or trims the top
of its heap, so every training step faults in its activations afresh from the kernel: about 1.5 GB of fresh pages
per update forward of the CPU preset, about a second on 2 cores (docs/performance.md). Two settings stop it: large
blocks come from the heap, and the heap is never trimmed. The process's peak memory is unchanged; its memory no
longer shrinks between steps."""

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
_done = []


def keep_freed_memory():
    """Set glibc's malloc to keep freed memory for reuse (once per process; nothing on other systems)."""
    if _done or not sys.platform.startswith("linux"):
        return
    _done.append(True)
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(
            M_MMAP_THRESHOLD, 1 << 30
        )  # blocks below 1 GiB from the heap, reused when freed
        libc.mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1)  # never give the heap's top back
    except (OSError, AttributeError):  # another C library (musl): its own behaviour stays
        pass
