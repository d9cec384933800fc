"""Timing primitives shared by the harness and by the peer runners in ``bench/peers/``.

This module imports nothing but the standard library and torch, and no other effst module, so
a peer runner can load it by file path inside an isolated SpikingJelly environment and time its
kernels exactly the way effst's are timed (same warm-up, same L2 handling, same inputs).

Method (issue 6, item 3):
- CUDA: one CUDA-event pair per call, the L2 cache flushed (a buffer larger than L2 written)
  before every timed call and outside the events, inputs rotated when one set fits in L2;
  median over the calls after warm-up. Peak memory is ``max_memory_allocated`` above the
  allocation before the call.
- CPU: ``time.perf_counter`` around each call, median of the calls after warm-up, inputs
  rotated when one set fits in the last-level cache; the torch thread count is recorded.
- Kernel time (CUDA only, :func:`kernel_time`): the same call captured once in a CUDA graph
  and replayed (no Python, no launch overhead; L2 flushed before each replay), accepted only
  when the replay reproduces the eager call's outputs; where the call cannot be captured (host
  synchronisation, kernels on another stream), the sum of the device times of its kernels
  recorded by ``torch.profiler``. Eager wall and kernel time together say how host-bound a
  call is.
"""
from __future__ import annotations

import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from importlib import metadata
from typing import Any, Callable, Optional

import torch

def quartiles_of(samples) -> list:
    """``[q1, median, q3]`` of one or more samples, inside the measured range (``inclusive``:
    the default method extrapolates past the extremes for few samples); one sample: itself x 3.
    Every suite's quartiles come from here."""
    samples = list(samples)
    if len(samples) < 2:
        return [samples[0]] * 3
    return statistics.quantiles(samples, n=4, method="inclusive")


# ---------------------------------------------------------------------------- device helpers


def synchronize(device: str) -> None:
    """Wait for queued work on ``device`` ('cpu' is a no-op)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def cache_bytes(device: str) -> int:
    """Size of the cache that repeated calls could hit: the GPU's L2, or the CPU's largest cache."""
    if device.startswith("cuda"):
        return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20))
    largest = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            text = open(os.path.join(base, entry, "size")).read().strip()
            match = re.fullmatch(r"(\d+)([KMG]?)", text)
            if match:
                scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[match.group(2)]
                largest = max(largest, int(match.group(1)) * scale)
    except OSError:
        pass
    return largest or (32 << 20)  # unknown: assume a generous 32 MiB so small inputs rotate


def rotation_count(set_bytes: int, device: str, max_sets: int = 8) -> int:
    """How many distinct input sets to rotate through so a call cannot run from a warm cache.

    One set when a set is larger than the cache; otherwise enough sets that their total
    exceeds twice the cache, capped at ``max_sets`` (on CUDA the L2 flush covers the rest).
    """
    cache = cache_bytes(device)
    if set_bytes <= 0 or set_bytes > cache:
        return 1
    return max(2, min(max_sets, -(-2 * cache // set_bytes)))


class _L2Flush:
    """Overwrites a buffer twice the L2 size so the next kernel starts from a cold L2."""

    def __init__(self, device: str):
        self.buffer = None
        if device.startswith("cuda"):
            self.buffer = torch.empty(2 * cache_bytes(device), dtype=torch.int8, device=device)

    def __call__(self) -> None:
        if self.buffer is not None:
            self.buffer.zero_()


# ---------------------------------------------------------------------------- timing


def time_function(
    fn: Callable[[int], Any],
    *,
    device: str,
    warmup: int = 3,
    reps: int = 20,
    min_reps: int = 5,
    max_seconds: Optional[float] = None,
) -> dict:
    """Median wall time of ``fn(i)`` (``i`` = call index, for rotating inputs) after warm-up.

    ``max_seconds`` caps the timed phase: the repetition count is lowered (never below
    ``min_reps``) from the warm-up's per-call estimate. Returns milliseconds.
    """
    if warmup < 1 or reps < 1:
        raise ValueError(f"warmup and reps: expected >= 1, got {warmup} and {reps}")
    flush = _L2Flush(device)
    synchronize(device)
    start = time.perf_counter()
    fn(0)
    synchronize(device)
    first_call_ms = (time.perf_counter() - start) * 1e3  # includes JIT compilation
    start = time.perf_counter()
    for i in range(1, warmup):
        fn(i)
    synchronize(device)
    per_call = (time.perf_counter() - start) / max(warmup - 1, 1) if warmup > 1 else first_call_ms / 1e3
    if max_seconds is not None and per_call > 0:
        reps = max(min(min_reps, reps), min(reps, int(max_seconds / per_call)))
    times_ms: list[float] = []
    if device.startswith("cuda"):
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            flush()
            starts[i].record()
            fn(warmup + i)
            ends[i].record()
        torch.cuda.synchronize()
        times_ms = [s.elapsed_time(e) for s, e in zip(starts, ends)]
        method = "CUDA events per call, L2 flushed before each call, median"
    else:
        for i in range(reps):
            start = time.perf_counter()
            fn(warmup + i)
            times_ms.append((time.perf_counter() - start) * 1e3)
        method = "time.perf_counter per call, median"
    times_ms.sort()
    quartiles = quartiles_of(times_ms)
    return {
        "ms": statistics.median(times_ms),
        "ms_min": times_ms[0],
        "ms_q1": quartiles[0],
        "ms_q3": quartiles[2],
        "reps": reps,
        "warmup": warmup,
        "first_call_ms": first_call_ms,
        "method": method,
    }


def peak_memory_bytes(fn: Callable[[], Any], device: str) -> Optional[int]:
    """Peak CUDA memory allocated by one call of ``fn`` above what was allocated before it."""
    if not device.startswith("cuda"):
        return None  # torch keeps no allocator statistics for the CPU
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - before)


def copy_bandwidth(device: str, nbytes: int, *, warmup: int = 3, reps: int = 10) -> dict:
    """Measured device copy bandwidth: ``dst.copy_(src)`` of ``nbytes`` fp32, read + write counted."""
    numel = max(1, nbytes // 4)
    generator = torch.Generator(device=device).manual_seed(1234)
    src = torch.randn(numel, generator=generator, device=device)
    dst = torch.empty_like(src)
    timing = time_function(lambda i: dst.copy_(src), device=device, warmup=warmup, reps=reps)
    moved = 2 * numel * 4
    return {
        "bytes_per_s": moved / (timing["ms"] * 1e-3),
        "buffer_bytes": numel * 4,
        "ms": timing["ms"],
        "reps": timing["reps"],
        "method": "dst.copy_(src), fp32, bytes counted = read + write = 2 x buffer; " + timing["method"],
    }


def _outputs(value) -> list:
    """The tensors of a call's result (a tensor, or a tuple/list of them; None entries dropped)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [v for v in value if isinstance(v, torch.Tensor)]
    return []


def _graph_kernel_time(call: Callable[[], Any], reps: int) -> dict:
    """Capture ``call`` in a CUDA graph, check the replay against an eager call, time replays."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # autograd and allocators warm up outside the capture
        for _ in range(2):
            call()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _outputs(call())
    if not captured:
        raise RuntimeError("the call returned no tensors to check the graph replay against")
    for tensor in captured:  # poison, so a replay that computes nothing cannot pass the check
        if tensor.is_floating_point():
            tensor.fill_(float("nan"))
    graph.replay()
    expected = _outputs(call())
    torch.cuda.synchronize()
    for got, want in zip(captured, expected):
        if not torch.allclose(got.float(), want.float(), rtol=1e-3, atol=1e-3, equal_nan=False):
            raise RuntimeError("the graph replay does not reproduce the eager call (work outside the "
                               "captured stream?)")
    flush = _L2Flush("cuda")
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    graph.replay()  # first replay uploads the graph
    for i in range(reps):
        flush()
        starts[i].record()
        graph.replay()
        ends[i].record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    del graph
    return {"kernel_ms": statistics.median(times), "kernel_ms_min": times[0], "kernel_reps": reps,
            "kernel_method": "CUDA graph replay of the same call (checked against eager), L2 flushed, median"}


def _profiler_kernel_time(call: Callable[[], Any], reps: int) -> dict:
    """Sum of the device times of the kernels ``call`` launches, per call, from torch.profiler."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            call()
        torch.cuda.synchronize()
    total_us = sum(event.time_range.elapsed_us() for event in prof.events()
                   if getattr(event, "device_type", None) == DeviceType.CUDA)
    if total_us <= 0:  # device events not listed on their own: the per-operator self device times
        total_us = sum(getattr(event, "self_device_time_total", 0) for event in prof.key_averages())
    if total_us <= 0:
        raise RuntimeError("the profiler recorded no CUDA kernels for the call")
    return {"kernel_ms": total_us / reps / 1e3, "kernel_ms_min": None, "kernel_reps": reps,
            "kernel_method": "torch.profiler: sum of the call's kernel durations / calls (not capturable "
                             "in a CUDA graph); L2 not flushed between calls"}


def kernel_time_profiled(call: Callable[[], Any], device: str, *, reps: int = 3) -> dict:
    """Profiler device time of ``call()`` alone (for calls that must not be captured); ``{}`` on the CPU."""
    if not device.startswith("cuda"):
        return {}
    try:
        return _profiler_kernel_time(call, reps)
    except Exception as exc:
        return {"kernel_ms": None, "kernel_method": None, "kernel_error": f"{type(exc).__name__}: {str(exc)[:300]}"}


def kernel_time(call: Callable[[], Any], device: str, *, reps: int = 20, capture: bool = True,
                also_profile: bool = False) -> dict:
    """Device time of one ``call()`` without host overhead (see the module docstring).

    Returns ``kernel_ms``, ``kernel_ms_min``, ``kernel_reps``, ``kernel_method`` and, when the
    graph capture was refused, ``kernel_graph_error``; on the CPU (no such split) ``{}``.
    ``capture=False`` goes straight to the profiler (for kernels known to launch outside torch's
    stream, e.g. cupy's: a capture attempt would only fail). ``also_profile``: after a graph
    replay, the profiler's figure too (``kernel_profiler_ms``), to compare like with like against
    a peer that only the profiler can time.
    """
    if not device.startswith("cuda"):
        return {}
    graph_error = "not attempted: the call launches kernels outside torch's stream"
    if capture:
        try:
            result = _graph_kernel_time(call, reps)
            if also_profile:
                result["kernel_profiler_ms"] = kernel_time_profiled(call, device, reps=5).get("kernel_ms")
            return result
        except Exception as exc:  # not capturable: the profiler sees every kernel wherever it runs
            graph_error = f"{type(exc).__name__}: {str(exc)[:300]}"
            try:
                torch.cuda.synchronize()
            except Exception:  # a failed capture is not sticky; if it were, the profiler says so
                pass
    try:
        result = _profiler_kernel_time(call, max(3, reps // 4))
    except Exception as exc:
        return {"kernel_ms": None, "kernel_method": None, "kernel_graph_error": graph_error,
                "kernel_error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    result["kernel_graph_error"] = graph_error
    return result


# ---------------------------------------------------------------------------- neuron inputs


def neuron_inputs(
    T: int, step_shape: tuple, dtype: torch.dtype, device: str, *, seed: int, sets: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fresh random ``(x, grad_spikes)`` pairs, identical for every implementation given a seed.

    ``x ~ N(0.5, 1.5^2)`` makes a membrane with tau = 2 and V_th = 1 fire on roughly a fifth
    of the steps (so the reset and surrogate paths both run); ``grad_spikes ~ N(0, 1)``.
    Generated in fp32 and then cast, so every dtype sees the same values up to rounding.
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    pairs = []
    for _ in range(sets):
        x = (torch.randn((T, *step_shape), generator=generator, device=device) * 1.5 + 0.5).to(dtype)
        grad = torch.randn((T, *step_shape), generator=generator, device=device).to(dtype)
        pairs.append((x.requires_grad_(True), grad))
    return pairs


def time_neuron(
    module: torch.nn.Module,
    reset: Callable[[], None],
    *,
    T: int,
    step_shape: tuple,
    dtype: torch.dtype,
    device: str,
    seed: int,
    warmup: int,
    reps: int,
    max_seconds: Optional[float],
    capture: bool = True,
    also_profile: bool = False,
) -> dict:
    """Forward + backward of a multi-step neuron module on fresh random inputs.

    One call = ``reset()``, ``spikes = module(x)``, then ``torch.autograd.grad`` of the spikes
    with respect to x and every trainable parameter (no gradient accumulation, nothing to zero).
    ``ms`` is the eager wall time of a call; on CUDA ``kernel_ms`` is its device time
    (:func:`kernel_time`, ``capture`` and ``also_profile`` passed on).
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    set_bytes = 2 * T * math.prod(step_shape) * itemsize
    sets = rotation_count(set_bytes, device)
    inputs = neuron_inputs(T, step_shape, dtype, device, seed=seed, sets=sets)
    params = [p for p in module.parameters() if p.requires_grad]

    def call(i: int):
        x, grad = inputs[i % sets]
        reset()
        spikes = module(x)
        return torch.autograd.grad(spikes, [x, *params], grad)

    result = time_function(call, device=device, warmup=warmup, reps=reps, max_seconds=max_seconds)
    result["input_sets"] = sets
    result["peak_memory_bytes"] = peak_memory_bytes(lambda: call(0), device)
    result.update(kernel_time(lambda: call(0), device, reps=min(reps, 20), capture=capture,
                              also_profile=also_profile))
    spikes = None
    with torch.no_grad():
        reset()
        spikes = module(inputs[0][0])
    result["firing_rate"] = float(spikes.float().mean())
    reset()
    return result


# ---------------------------------------------------------------------------- environment facts


def _version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    """Versions of everything that decides a timing (without importing the optional ones)."""
    found = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "spikingjelly": _version("spikingjelly"),
    }
    for dist in ("cupy-cuda13x", "cupy-cuda12x", "cupy-cuda11x", "cupy"):
        if _version(dist):
            found["cupy"] = f"{dist} {_version(dist)}"
            break
    else:
        found["cupy"] = None
    return found


def machine(device: str) -> dict:
    """Machine facts for the JSON: CPU model and cores, threads, and the GPU when used."""
    info = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        # other processes compete for the cores and memory bus: say how busy the machine was
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu_name=props.name,
            gpu_capability=f"{props.major}.{props.minor}",
            gpu_memory_bytes=int(props.total_memory),
            gpu_l2_bytes=int(getattr(props, "L2_cache_size", 0)),
            gpu_count=torch.cuda.device_count(),
            cuda_driver=_nvidia_smi("driver_version"),
        )
    else:
        info["cpu_cache_bytes"] = cache_bytes("cpu")
    return info


def cpu_model() -> str:
    """The CPU's model name (lscpu, else /proc/cpuinfo, else platform)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _nvidia_smi(field: str) -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


if __name__ == "__main__":  # quick look: python effst/benchmarks/timing.py [cpu|cuda]
    dev = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    print(json.dumps({"machine": machine(dev), "versions": versions(),
                      "copy": copy_bandwidth(dev, 256 << 20)}, indent=2))
