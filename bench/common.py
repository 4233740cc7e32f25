"""Shared benchmark plumbing: round-robin medians, peak extra memory in a fresh process, a ratio table."""
from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch


# What our trainers set for themselves (cai_engine/train/allocator.py): glibc's mmap blocks and heap trimming off, so
# freed memory is reused instead of page-faulted in again on every step. A peer trainer ("trl+retain") runs with it as
# well as without ("trl"), and is compared at its best: speed against its faster run, memory against its smaller peak.
RETAIN_FREED_MEMORY = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}


def variant_env(variant: str) -> dict[str, str]:
    """The environment a benchmark variant's process runs in: "+retain" adds the allocator setting above."""
    return dict(os.environ, PYTHONUNBUFFERED="1", **(RETAIN_FREED_MEMORY if variant.endswith("+retain") else {}))


def peer_best(results: dict[str, dict], peer: str, time_key: str, memory_key: str = "peak_rss_mib"
              ) -> tuple[float | None, float | None]:
    """The peer's best time and smallest peak memory over its allocator settings ("trl", "trl+retain")."""
    runs = [r for name, r in results.items() if name.partition("+")[0] == peer]
    if not runs:
        return None, None
    return min(r[time_key] for r in runs), min(r[memory_key] for r in runs)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_times(fns: dict[str, Callable[[], None]], repeats: int, device: str = "cpu") -> dict[str, float]:
    """Median wall time of each function; runs them round-robin so machine noise hits all alike."""
    for fn in fns.values():  # warm-up (kernel compilation, allocator)
        fn()
        sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            gc.collect()
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_peak_here(setup: Callable[[], Callable[[], None]], device: str) -> int:
    """Peak bytes allocated beyond what `setup` left (inputs), while running its returned function once."""
    fn = setup()
    fn()  # warm-up: one-time allocations (lazy imports, thread pools, kernel compilation) are not the op's
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    base = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
        f.write("5")
    fn()
    return (_rss_kib("VmHWM") - base) * 1024


def peak_extra_memory(script: str, args: list[str], extra_env: dict[str, str] | None = None) -> int:
    """Run `script --measure-memory ...` in a fresh process (CPU RSS peaks cannot be reset reliably in-process)."""
    # A fixed mmap threshold makes glibc return every large block on free, so RSS peaks are the op's own
    # (by default the threshold grows after the warm-up and freed blocks stay resident, hiding the peak).
    env = dict(os.environ, PYTHONUNBUFFERED="1", MALLOC_MMAP_THRESHOLD_="131072", **(extra_env or {}))
    out = subprocess.run([sys.executable, script, *args], check=True, capture_output=True, text=True, env=env)
    return int(json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"])


def table(title: str, rows: dict[str, dict], baseline_names: list[str]) -> str:
    """Markdown table: time, memory, and ratios of the first row against each named peer."""
    lines = [f"### {title}", "", "| impl | median s | peak extra MiB | " + " | ".join(f"time / {b}" for b in baseline_names)
             + " |", "|---|---|---|" + "---|" * len(baseline_names)]
    for name, r in rows.items():
        ratios = [f"{r['time'] / rows[b]['time']:.2f}x" if b in rows else "-" for b in baseline_names]
        mem = "-" if r.get("mem") is None else f"{r['mem'] / 2**20:.0f}"
        lines.append(f"| {name} | {r['time']:.3f} | {mem} | " + " | ".join(ratios) + " |")
    return "\n".join(lines)


def machine_line(device: str) -> str:
    if device.startswith("cuda"):
        hw = torch.cuda.get_device_name()
    else:
        hw = f"{cpu_model()}, {os.cpu_count()} CPU threads (torch uses {torch.get_num_threads()})"
    return f"{time.strftime('%Y-%m-%d')}, {hw}, torch {torch.__version__}"


def cpu_model() -> str:
    """The CPU's name and its bf16 path: figures differ by several times between an AMX core and a VDPBF16PS one."""
    from cai_engine import _native
    name = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    from cai_engine.ops.backend import cpu_flags
    flags = cpu_flags() or frozenset()
    vectors = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    bf16 = ("AMX-BF16" if _native.amx_available() else "AVX512-BF16, no AMX") if _native.bf16_kernels_available() \
        else f"{vectors}, no bf16 instructions"
    return f"{name} ({bf16})"


# ---------------------------------------------------------------- trainer benchmarks (ours vs TRL, one process each)

def word_text(seed: int = 0) -> Callable[[int], str]:
    """`text(n)`: n random common words of the embedded default's vocabulary, about one token each."""
    import random
    from cai_engine import load_model
    _, tok = load_model("smollm2-135m-instruct")
    rnd = random.Random(seed)
    words = [w for w in (tok.decode([i]) for i in range(2000, 12000)) if w.startswith(" ") and w[1:].isalpha()]
    return lambda n: "".join(rnd.choice(words) for _ in range(n)).strip()


def trainer_step_timer(times: list[float]):
    """A transformers TrainerCallback appending each optimizer step's wall time to `times`."""
    import transformers

    class StepTimer(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.start)
    return StepTimer()


def hf_copy_of_default(directory) -> None:
    """The embedded default in the Hugging Face layout (transformers will not train a model loaded from GGUF)."""
    from cai_engine import load_model, save_model
    model, tok = load_model("smollm2-135m-instruct")
    save_model(model, tok, directory)
