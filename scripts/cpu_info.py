"""The CPU a benchmark ran on, for the head of every table: model, cores, and the widest vector ISA
numba compiles for (its target CPU, `NUMBA_CPU_NAME` when set: `haswell` emulates an AVX2 machine)."""

from __future__ import annotations

import os
import platform


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def isa() -> str:
    """The machine's widest x86 vector extension (avx512f > avx2 > avx > sse4.2)."""
    flags = cpu_flags()
    for name, flag in (("AVX-512", "avx512f"), ("AVX2", "avx2"), ("AVX", "avx"), ("SSE4.2", "sse4_2")):
        if flag in flags:
            return name
    return platform.machine()


def cpu_line() -> str:
    target = os.environ.get("NUMBA_CPU_NAME")
    jit = f", numba target {target}" if target else ""
    return f"CPU {cpu_model()} x{os.cpu_count()}, ISA {isa()}{jit}"
