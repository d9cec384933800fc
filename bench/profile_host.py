"""Where the host time of a tiny effst call goes, on a GPU machine (bench/gpu_check.sh runs it).

    python bench/profile_host.py [--calls 300]

For x = [4, 64, 64] fp32 on CUDA: the eager time per forward+backward call (``calls`` back to
back, synchronised at the end) of effst SLIF and LIF (Triton and native CUDA backends), the
PyTorch baseline ``sigmoid(x * w + b)``, a bare launch of an empty Triton kernel and a bare
``torch.empty``; then cProfile's top functions and the profiler's top CPU ops for SLIF; the
native CUDA backend last (its first call may build the extension). Prints
text only (it goes into gpu_check.log); the figures are host cost, not kernel time.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch
import triton
import triton.language as tl

from effst.nn import LIF, SLIF


@triton.jit
def _empty_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.load(x_ptr + offs, mask=offs < n)


def per_call_us(call, calls: int) -> float:
    for _ in range(20):
        call()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        call()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def neuron_call(module, x, grad):
    params = list(module.parameters())

    def call():
        module.reset()
        return torch.autograd.grad(module(x), [x, *params], grad)
    return call


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    calls = parser.parse_args().calls
    if not torch.cuda.is_available():
        print("profile_host: no CUDA device; nothing to do")
        return 0
    device = "cuda"
    x = torch.randn(4, 64, 64, device=device, requires_grad=True)
    grad = torch.ones_like(x)
    w = torch.zeros(64, device=device, requires_grad=True)
    b = torch.zeros(64, device=device, requires_grad=True)
    buffer = torch.zeros(64, device=device)
    cases = {
        "baseline sigmoid(x*w+b) fwd+grad": lambda: torch.autograd.grad(torch.sigmoid(x * w + b), [x, w, b], grad),
        "effst SLIF triton fwd+grad": neuron_call(SLIF(channels=64, backend="triton").to(device), x, grad),
        "effst LIF triton fwd+grad": neuron_call(LIF(backend="triton").to(device), x, grad),
        "empty Triton kernel launch": lambda: _empty_kernel[(1,)](buffer, 64, BLOCK=64),
        "torch.empty(64)": lambda: torch.empty(64, device=device),
        "torch.add (1 kernel)": lambda: buffer.add(1.0),
    }
    print(f"profile_host: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    for name, call in cases.items():
        try:
            print(f"  {name:40s} {per_call_us(call, calls):9.1f} us/call")
        except Exception as error:  # report and go on
            print(f"  {name:40s} ERROR {type(error).__name__}: {str(error)[:200]}")
    slif_call = cases["effst SLIF triton fwd+grad"]
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(calls):
        slif_call()
    torch.cuda.synchronize()
    profile.disable()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(25)
    print(f"cProfile, {calls} SLIF triton calls, by own time:")
    print("\n".join(line for line in text.getvalue().splitlines() if line.strip())[:6000])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(50):
            slif_call()
        torch.cuda.synchronize()
    print("torch.profiler, 50 SLIF triton calls, CPU ops by self time:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=50))
    # last: the first native call may build the CUDA extension (a minute where it is not cached)
    native = neuron_call(SLIF(channels=64, backend="native").to(device), x, grad)
    print(f"  {'effst SLIF native fwd+grad':40s} {per_call_us(native, calls):9.1f} us/call")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
