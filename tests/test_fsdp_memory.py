"""Under FSDP on CPU the program sets glibc's mmap threshold itself (utils/model/fsdp_utils.py): freed
gathered layers must leave the resident set, without users knowing MALLOC_MMAP_THRESHOLD_."""

import os
import subprocess
import sys

import pytest
from helpers import ROOT, process_env

PROBE = """
import gc, sys
sys.path.insert(0, sys.argv[1])
from utils.model.fsdp_utils import return_freed_memory_at_once

def rss_mib():
    return next(int(l.split()[1]) // 1024 for l in open("/proc/self/status") if l.startswith("VmRSS"))

applied = return_freed_memory_at_once() if sys.argv[2] == "on" else False
warm = bytearray(4 << 20)
del warm  # glibc's default: freeing an mmap-ed block raises its threshold, the next ones go to the heap
blocks, pins = [], []
for _ in range(50):  # 200 MiB of 4 MiB blocks (a gathered layer each), small live blocks between them
    blocks.append(bytearray(4 << 20))
    pins.append(bytearray(32 << 10))
before = rss_mib()
del blocks
gc.collect()
print(applied, before - rss_mib())
"""


def freed_mib(mode, **env):
    result = subprocess.run(
        [sys.executable, "-c", PROBE, ROOT, mode], capture_output=True, text=True, env=process_env(**env), check=True
    )
    applied, freed = result.stdout.split()
    return applied == "True", int(freed)


@pytest.mark.skipif(not os.path.exists("/proc/self/status") or sys.platform != "linux", reason="glibc on Linux")
def test_freed_blocks_leave_the_resident_set_once_the_threshold_is_set():
    applied, freed = freed_mib("on")
    assert applied and freed >= 180  # about all of the 200 MiB
    applied, freed = freed_mib("off")
    assert not applied and freed < 50  # glibc's default keeps them in the heap
    applied, freed = freed_mib("on", MALLOC_MMAP_THRESHOLD_="65536")
    assert not applied and freed >= 180  # the user's own setting wins, and works alike
