"""The `xlsr-jax` command starts again with glibc's malloc asking for transparent huge pages."""

import importlib.metadata
import json
import os
import subprocess
import sys

from xlsr_jax.host_memory import (HUGETLB_TUNABLE, MIN_GLIBC, REEXEC_MARKER, glibc_version, huge_pages_env,
                                  thp_mode)

# Starts again (or not), then mallocs and fills 256 MiB and prints its pid, tunables and page faults.
PROBE = """
import ctypes, os, resource, sys
print("start", os.getpid(), flush=True)
from xlsr_jax.host_memory import reexec_with_huge_pages
reexec_with_huge_pages()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
size = 256 << 20
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
ptr = libc.malloc(size)
ctypes.memset(ptr, 1, size)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print("ran", os.getpid(), os.environ.get("GLIBC_TUNABLES", ""), faults, flush=True)
"""


def test_the_environment_gains_the_tunable_only_where_it_changes_something():
    env = {"PATH": "/bin"}
    assert huge_pages_env(env, (2, 36), "madvise") == {
        "PATH": "/bin", "GLIBC_TUNABLES": f"{HUGETLB_TUNABLE}=1", REEXEC_MARKER: "1"}
    kept = huge_pages_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, (2, 36), "madvise")
    assert kept["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{HUGETLB_TUNABLE}=1"
    assert huge_pages_env(env, (2, 34), "madvise") is None  # glibc without the tunable
    assert huge_pages_env(env, None, "madvise") is None  # not glibc (musl)
    assert huge_pages_env(env, (2, 36), "always") is None  # every mapping gets huge pages already
    assert huge_pages_env(env, (2, 36), "never") is None
    assert huge_pages_env(env, (2, 36), None) is None  # no such kernel setting
    assert huge_pages_env({"GLIBC_TUNABLES": f"{HUGETLB_TUNABLE}=0"}, (2, 36), "madvise") is None  # the opt-out
    assert huge_pages_env({REEXEC_MARKER: "1"}, (2, 36), "madvise") is None  # started again once already


def test_the_kernel_mode_is_read_from_its_brackets(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert thp_mode(str(path)) == "madvise"
    path.write_text("[always] madvise never\n")
    assert thp_mode(str(path)) == "always"
    assert thp_mode(str(tmp_path / "missing")) is None


def test_the_console_script_is_the_entry_that_starts_again():
    (script,) = importlib.metadata.entry_points(group="console_scripts", name="xlsr-jax")
    assert script.value == "xlsr_jax.cli:console_main"


def test_the_process_starts_again_in_place_and_its_malloc_faults_huge_pages():
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", REEXEC_MARKER)}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120,
                         check=True).stdout.split("\n")
    starts = [line.split() for line in out if line.startswith("start")]
    (ran,) = [line.split() for line in out if line.startswith("ran")]
    _, pid, *tunables, faults = ran
    pages_4k = (256 << 20) // 4096
    glibc = glibc_version()
    if glibc is not None and glibc >= MIN_GLIBC and thp_mode() == "madvise":
        assert len(starts) == 2 and starts[0][1] == starts[1][1] == pid  # the same process, started twice
        assert tunables == [f"{HUGETLB_TUNABLE}=1"]
        assert int(faults) < pages_4k // 8  # 2 MiB faults, not 65536 of 4 KiB
    else:  # nothing to gain here: the process runs once, as it was started
        assert len(starts) == 1 and tunables == []


# Leaves 180 MB freed between live 1 kB blocks (glibc cannot give it back by itself: the live blocks
# pin the heap's top), then releases it.
FRAGMENTED = """
import json, os
from xlsr_jax.host_memory import release_free_memory
def resident():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
keep, junk = [], []
for i in range(200_000):
    (keep if i % 10 == 0 else junk).append(bytearray(1000))
del junk
before = resident()
released = release_free_memory()
print(json.dumps({"before": before, "after": resident(), "released": released}))
"""


def test_release_free_memory_hands_a_fragmented_heaps_free_pages_back():
    out = subprocess.run([sys.executable, "-c", FRAGMENTED], capture_output=True, text=True, check=True,
                         env={**os.environ, "GLIBC_TUNABLES": ""})
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if glibc_version() is None:
        assert result["released"] is None
        return
    assert result["released"] > 64 << 20  # measured: ~100 MB of the 180 MB freed
    assert result["after"] < result["before"] - (64 << 20)
