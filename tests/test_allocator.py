"""The training process keeps freed memory for reuse (cai_engine/train/allocator.py): a large tensor allocated
again after it was freed is not page-faulted in a second time. Each case runs in its own process, as the
allocator setting is for the whole process."""
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or not os.confstr("CS_GNU_LIBC_VERSION"),
                                reason="glibc only")

PROBE = """
import resource, torch
from cai_engine.train.allocator import retain_freed_memory
print(retain_freed_memory())
def faults_of_one_fill():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 << 20)  # 64 MiB, above glibc's largest mmap threshold; freed at once
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_one_fill()
print(min(faults_of_one_fill() for _ in range(3)))
"""


def faults_on_reuse(setting: str) -> tuple[str, int]:
    env = dict(os.environ, CAI_ENGINE_MALLOC=setting)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    line, faults = out.stdout.strip().splitlines()[-2:]
    return line, int(faults)


def test_freed_memory_is_reused_without_page_faults():
    line, faults = faults_on_reuse("retain")
    assert "kept for reuse" in line
    assert faults < 1000          # 64 MiB is 16,384 pages of 4 KiB: none faulted again


def test_system_setting_keeps_the_c_library_defaults():
    line, faults = faults_on_reuse("system")
    assert "CAI_ENGINE_MALLOC=system" in line
    assert faults > 10_000        # every fill of a fresh mapping faults its pages in (hence the setting)


def test_unknown_setting_is_refused():
    env = dict(os.environ, CAI_ENGINE_MALLOC="jemalloc")
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "CAI_ENGINE_MALLOC = 'jemalloc': expected retain or system" in out.stderr
