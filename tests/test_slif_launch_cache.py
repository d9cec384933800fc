"""The sLIF launchers' per-plan cache of compiled Triton kernels (effst/ops/launch.py, launch).

On the CPU the kernels are replaced by stand-ins for a JITFunction and the CompiledKernel its
``kernel[grid](...)`` returns (FakeKernel, from tests/test_launch_cache.py), so the cache-key
logic runs without a GPU: the first launch of a specialisation goes through ``kernel[grid]``,
later ones through ``CompiledKernel.run`` with the same arguments in the kernel's signature
order, and anything that changes the specialisation (flags, alignment, the int specialisation
of the row stride, device, debug settings) or disables the cache (launch hooks,
EFFST_SLIF_LAUNCH_CACHE=0, the interpreter) goes through ``kernel[grid]`` again. The ``gpu`` test compares cached launches with JIT
launches bit for bit on CUDA.
"""
import pytest
import torch
from test_launch_cache import FakeKernel, describe, launch_hook
from triton import knobs

from effst.nn import LIF, SLIF
from effst.ops import launch as launch_ops
from effst.ops import slif as slif_ops


@pytest.fixture
def fake(monkeypatch):
    kernels = {"forward": FakeKernel(slif_ops.slif_forward_kernel),
               "backward": FakeKernel(slif_ops.slif_backward_kernel)}
    monkeypatch.setattr(slif_ops, "slif_forward_kernel", kernels["forward"])
    monkeypatch.setattr(slif_ops, "slif_backward_kernel", kernels["backward"])
    monkeypatch.setattr(launch_ops, "_cacheable", lambda kernel: slif_ops.LAUNCH_CACHE)
    monkeypatch.setattr(launch_ops, "_device_and_stream", lambda: (0, 1234))
    return kernels


def _counts(kernels):
    return {name: (len(k.jit), len(k.compiled.runs)) for name, k in kernels.items()}


def _step(module, x):
    module.reset()
    inputs = [x] + [p for p in module.parameters() if p.requires_grad]
    spikes = module(x)
    torch.autograd.grad(spikes, inputs, torch.ones_like(spikes))


def test_second_launch_runs_the_compiled_kernel_with_the_jit_arguments(fake):
    x = torch.randn(5, 3, 32, requires_grad=True)
    m = SLIF(channels=32, backend="triton")
    _step(m, x)
    assert _counts(fake) == {"forward": (1, 0), "backward": (1, 0)}
    _step(m, x)
    assert _counts(fake) == {"forward": (1, 1), "backward": (1, 1)}
    for kernel in fake.values():
        grid, args, kwargs = kernel.jit[0]
        run = kernel.compiled.runs[0]
        assert run[:9] == (*grid, 1234, "function-handle", "packed-metadata", None, None, None)
        assert list(kwargs) == kernel.constexpr_names + ["num_warps"]
        assert len(args) == kernel.runtime_count
        jit_order = [*args, *(kwargs[name] for name in kernel.constexpr_names)]
        assert [describe(a) for a in run[9:]] == [describe(a) for a in jit_order]
    # the plan's cache holds one compiled kernel per specialisation
    plan = next(iter(m._plans.values()))
    assert len(plan.launch_cache) == 2


def test_constexprs_follow_the_kernel_signatures():
    # CompiledKernel.run takes every argument positionally: the launch configuration's
    # constexpr dicts must list them in the kernels' own order.
    m = SLIF(channels=4, backend="triton")
    m(torch.randn(2, 4))
    plan = next(iter(m._plans.values()))
    cfg = plan.launch
    forward = FakeKernel(slif_ops.slif_forward_kernel).constexpr_names
    backward = FakeKernel(slif_ops.slif_backward_kernel).constexpr_names
    assert forward == ["HAS_V_INIT", *cfg.forward_constexprs]
    assert backward == ["HAS_V_INIT", "HAS_GRAD_V_FINAL", *cfg.backward_constexprs,
                        "NEED_GRAD_X", "NEED_GRAD_W", "NEED_GRAD_THETA", *cfg.backward_tail]


def test_a_new_specialisation_goes_through_the_jit(fake, monkeypatch):
    T, N = 4, 32
    m = SLIF(backend="triton")
    x = torch.randn(T, N, requires_grad=True)
    _step(m, x)
    _step(m, x)
    assert _counts(fake) == {"forward": (1, 1), "backward": (1, 1)}
    # state carried over: v_init present (new forward and backward flags)
    m.reset()
    m(x.detach())  # cached
    m(x.detach())  # v_init: new
    assert _counts(fake)["forward"] == (2, 2)
    # frozen parameters: NEED_GRAD_W / NEED_GRAD_THETA off
    for p in m.parameters():
        p.requires_grad_(False)
    _step(m, x)
    assert _counts(fake)["backward"] == (2, 1)
    _step(m, x)
    assert _counts(fake)["backward"] == (2, 2)
    for p in m.parameters():
        p.requires_grad_(True)
    # a row stride of 33 instead of 32: no longer divisible by 16
    wide = torch.randn(T, N + 1)[:, :N].requires_grad_(True)
    before = _counts(fake)
    _step(m, wide)
    assert _counts(fake)["forward"] == (before["forward"][0] + 1, before["forward"][1])
    # a pointer off 16-byte alignment: launched through the JIT every time, never cached
    shifted = torch.randn(T * N + 1)[1:].view(T, N).requires_grad_(True)
    assert shifted.data_ptr() % 16
    before = _counts(fake)
    _step(m, shifted)
    _step(m, shifted)
    assert _counts(fake) == {name: (j + 2, r) for name, (j, r) in before.items()}
    # Triton's debug setting changes the compile options
    monkeypatch.setattr(knobs.runtime, "debug", True)
    before = _counts(fake)
    _step(m, x)
    assert _counts(fake) == {name: (j + 1, r) for name, (j, r) in before.items()}
    # another current device
    monkeypatch.setattr(launch_ops, "_device_and_stream", lambda: (1, 99))
    before = _counts(fake)
    _step(m, x)
    assert _counts(fake) == {name: (j + 1, r) for name, (j, r) in before.items()}


def test_launch_hooks_and_the_switch_bypass_the_cache(fake, monkeypatch):
    x = torch.randn(4, 2, 16, requires_grad=True)
    m = LIF(backend="triton")
    _step(m, x)
    _step(m, x)
    assert _counts(fake) == {"forward": (1, 1), "backward": (1, 1)}
    with launch_hook():  # what a profiler does
        _step(m, x)
    assert _counts(fake) == {"forward": (2, 1), "backward": (2, 1)}
    monkeypatch.setattr(slif_ops, "LAUNCH_CACHE", False)  # EFFST_SLIF_LAUNCH_CACHE=0
    _step(m, x)
    assert _counts(fake) == {"forward": (3, 1), "backward": (3, 1)}


def test_only_compiled_kernels_are_cached(device):
    # under the interpreter (the CPU tests) the kernels are not JITFunctions: never cached
    for kernel in (slif_ops.slif_forward_kernel, slif_ops.slif_backward_kernel):
        assert launch_ops._cacheable(kernel) == (device == "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_cached_launches_equal_jit_launches_bit_for_bit(dtype, device, monkeypatch):
    torch.manual_seed(31)
    x = (torch.randn(6, 8, 256, device=device) + 0.4).to(dtype).requires_grad_(True)
    grad = torch.randn_like(x)

    def run(module):
        module.reset()
        params = [p for p in module.parameters() if p.requires_grad]
        spikes = module(x)
        return [spikes.detach(), *torch.autograd.grad(spikes, [x, *params], grad)]

    jit_runs = []
    for kernel in (slif_ops.slif_forward_kernel, slif_ops.slif_backward_kernel):
        original = kernel.run

        def counting(*args, _original=original, **kwargs):
            jit_runs.append(1)
            return _original(*args, **kwargs)
        monkeypatch.setattr(kernel, "run", counting)
    m = SLIF(channels=256, backend="triton").to(device)
    first = run(m)  # compiles (or loads) through the JIT and fills the plan's cache
    assert len(next(iter(m._plans.values())).launch_cache) == 2
    jit_before = len(jit_runs)
    cached = [run(m) for _ in range(3)]
    assert len(jit_runs) == jit_before, "a cached launch went through JITFunction.run"
    monkeypatch.setattr(slif_ops, "LAUNCH_CACHE", False)
    reference = run(SLIF(channels=256, backend="triton").to(device))
    for results in [first, *cached]:
        for got, want in zip(results, reference):
            assert torch.equal(got, want)
