"""The host's malloc: transparent huge pages, set up when the `xlsr-jax` command starts, and the
compiler's freed memory handed back to the system before a compiled program first runs.

On a CPU, XLA's runtime allocates each execution's scratch memory (3.4 GiB for the base model's
4 x 5 s train step) with malloc. glibc serves an allocation that large from a fresh `mmap` and unmaps
it when the execution ends, so every step faults its scratch memory in again, 4 KiB at a time:
about a million page faults and 2 s of kernel time in a 6 s step on the CI machine. glibc's
`glibc.malloc.hugetlb=1` tunable (glibc 2.35 and later) makes malloc ask for transparent huge pages
(`madvise(MADV_HUGEPAGE)`) for the memory it maps, so the same memory faults in 2 MiB at a time: the
step measured 14 % faster, 25 % at 20 s crops (BENCHMARKS.md). A kernel whose transparent huge pages
are in `madvise` mode (the CI machine's) gives huge pages only to memory asked for this way.

glibc reads its tunables once, when the process starts, so `reexec_with_huge_pages` starts the
command again in the same process (same PID, same arguments) with the tunable added to
`GLIBC_TUNABLES`. It does nothing off glibc, when the kernel's mode is not `madvise`, when
`GLIBC_TUNABLES` already sets `glibc.malloc.hugetlb` (so `GLIBC_TUNABLES=glibc.malloc.hugetlb=0`
turns it off), and in the process it started (`REEXEC_MARKER`).

XLA's compiler (HLO passes, MLIR, LLVM) makes many small allocations on several threads. When
it is done, glibc keeps what they freed in its heaps and hands back only a free stretch at the top of
each, so ~0.5 GiB of free memory stays resident in the base model's train process and adds to the first
step's peak. `release_free_memory` calls glibc's `malloc_trim(0)`, which gives the kernel every whole free
page in every heap; the train loop calls it when a newly compiled or loaded program is about to run
(0.06 s; the base step's peak RSS 4.64-4.68 -> 4.16 GiB in BENCHMARKS.md).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import time

HUGETLB_TUNABLE = "glibc.malloc.hugetlb"
MIN_GLIBC = (2, 35)  # the first glibc with the hugetlb tunable
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
# Set in the started-again process: it never starts again, even where glibc drops GLIBC_TUNABLES (setuid).
REEXEC_MARKER = "XLSR_JAX_HUGE_PAGES_REEXEC"


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the C library this process runs on, None when it is not glibc."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    except (ValueError, OSError, AttributeError):
        return None
    if name != "glibc":
        return None
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def thp_mode(path: str = THP_MODE_FILE) -> str | None:
    """The kernel's transparent huge page mode (`always`, `madvise` or `never`), None when unknown."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def huge_pages_env(environ: dict[str, str], glibc: tuple[int, int] | None, mode: str | None) -> dict[str, str] | None:
    """The environment to start again with, or None when this one needs no change."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if (glibc is None or glibc < MIN_GLIBC or mode != "madvise" or HUGETLB_TUNABLE in tunables
            or REEXEC_MARKER in environ):
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, (tunables, f"{HUGETLB_TUNABLE}=1"))),
            REEXEC_MARKER: "1"}


def reexec_with_huge_pages() -> None:
    """Replace this process by the same command with malloc's huge pages on; returns only when none is needed.

    Call it first thing in a console entry point, before threads or files are opened.
    """
    env = huge_pages_env(dict(os.environ), glibc_version(), thp_mode())
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:  # sys.orig_argv is the interpreter's own command line (`python /usr/bin/xlsr-jax train ...`)
        os.execve(sys.executable, sys.orig_argv, env)
    except OSError as e:  # the command still runs, with 4 KiB pages
        logging.getLogger(__name__).warning("could not start again with %s=1: %s", HUGETLB_TUNABLE, e)


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def release_free_memory() -> int | None:
    """Hand the free memory in glibc's heaps back to the kernel (`malloc_trim(0)`); returns the bytes by
    which this process's resident memory fell, None off glibc (where there is nothing to call)."""
    if glibc_version() is None:
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    before, start = _resident_bytes(), time.perf_counter()
    trim(0)
    released = max(before - _resident_bytes(), 0)
    logging.getLogger(__name__).info("handed %.2f GiB of free heap memory back to the system in %.2f s",
                                     released / 2**30, time.perf_counter() - start)
    return released
