"""effst/ops/launch.py, the cached launch every op uses, and BlockSparseLinear's launches through it.

On the CPU the kernels are replaced by stand-ins for a JITFunction and the CompiledKernel its
``kernel[grid](...)`` returns (FakeKernel, FakeCompiled; tests/test_slif_launch_cache.py uses
them too), so the cache-key logic runs without a GPU: the first launch of a specialisation goes
through ``kernel[grid]``, later ones through ``CompiledKernel.run`` with the same arguments in
the kernel's signature order, and anything that changes the binary (shape, dtypes, flags, the
int specialisation of a row stride, alignment, device, debug settings) or disables the cache
(launch hooks, the switches) goes through ``kernel[grid]`` again. The ``gpu`` test compares
BlockSparseLinear's cached launches with JIT launches bit for bit on CUDA.
"""
import contextlib
import inspect

import pytest
import torch
import triton.language as tl
from triton import knobs

from effst.nn.block_sparse import BlockSparseLinear
from effst.ops import block_sparse_linear as bsl
from effst.ops import launch as launch_ops

BSL_KERNELS = {"forward": "_bsl_forward_kernel", "grad_input": "_bsl_grad_input_kernel",
               "grad_weight": "_bsl_grad_weight_kernel", "sum_splits": "_sum_splits_kernel"}


def describe(value):
    """What a launch argument is, independent of which fresh buffer it was."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, value.device.type)
    return value


class FakeCompiled:
    function = "function-handle"
    packed_metadata = "packed-metadata"

    def __init__(self):
        self.runs = []

    def run(self, *args):
        self.runs.append(args)


class FakeKernel:
    """Stands in for a JITFunction: records ``kernel[grid](*args, **kwargs)``."""

    def __init__(self, kernel):
        parameters = inspect.signature(kernel.fn).parameters
        self.constexpr_names = [n for n, p in parameters.items()  # (annotations may be strings)
                                if p.annotation is tl.constexpr or p.annotation == "tl.constexpr"]
        self.runtime_count = len(parameters) - len(self.constexpr_names)
        self.jit = []
        self.compiled = FakeCompiled()

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.jit.append((grid, args, kwargs))
            return self.compiled
        return launch


def assert_runs_repeat_the_jit_launch(kernel: FakeKernel, options: list) -> None:
    """Every CompiledKernel.run got the first JIT launch's grid and arguments, in order."""
    grid, args, kwargs = kernel.jit[0]
    assert list(kwargs) == kernel.constexpr_names + options
    assert len(args) == kernel.runtime_count
    jit_order = [describe(a) for a in (*args, *(kwargs[name] for name in kernel.constexpr_names))]
    assert kernel.compiled.runs
    for run in kernel.compiled.runs:
        assert run[:9] == (*grid, 1234, "function-handle", "packed-metadata", None, None, None)
        assert [describe(a) for a in run[9:]] == jit_order


@contextlib.contextmanager
def launch_hook():
    """A launch enter hook installed, as a profiler installs one."""
    def hook(metadata):
        pass

    knobs.runtime.launch_enter_hook.add(hook)
    try:
        yield
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)


# ------------------------------------------------------------------------------ launch.py itself
def test_switches(monkeypatch):
    for general, own, on in (("1", "1", True), ("0", "1", False), ("1", "0", False), (None, None, True)):
        for name, value in (("EFFST_LAUNCH_CACHE", general), ("EFFST_X_LAUNCH_CACHE", own)):
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)
        monkeypatch.setattr(launch_ops, "ENABLED", general != "0")  # (read at import)
        assert launch_ops.switch("EFFST_X_LAUNCH_CACHE") is on


def test_int_key_follows_triton_specialisation():
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    kinds = {"i32": 0, "i64": 1, "u64": 2}
    for value in (0, 1, 2, 15, 16, 17, 32, 48, -16, -17, 2**31 - 16, 2**31, 2**31 + 16, -2**31, -2**31 - 16,
                  2**40, 2**63 - 16, 2**63, 2**64 - 1):
        kind, attribute = native_specialize_impl(BaseBackend, value, False, True, True)
        one, divisible, width = launch_ops.int_key(value)
        assert one == (kind == "constexpr"), value
        if not one:
            assert (divisible, width) == (attribute == "D", kinds[kind]), value


def test_constexpr_names_in_signature_order():
    assert launch_ops.constexpr_names(bsl._sum_splits_kernel) == ("BLOCK",)
    assert launch_ops.constexpr_names(bsl._bsl_forward_kernel) == (
        "HAS_BIAS", "BM", "BK", "GROUP", "BLOCK_M", "EVEN_K", "ACC_DTYPE", "INPUT_PRECISION", "NUM_STAGES")


def test_only_compiled_kernels_are_cached(device):
    # under the interpreter (the CPU tests) the kernels are not JITFunctions: never cached
    for name in BSL_KERNELS.values():
        assert launch_ops._cacheable(getattr(bsl, name)) == (device == "cuda")


# ------------------------------------------------------------------------------ BlockSparseLinear
@pytest.fixture
def fake(monkeypatch):
    kernels = {kind: FakeKernel(getattr(bsl, name)) for kind, name in BSL_KERNELS.items()}
    for kind, name in BSL_KERNELS.items():
        monkeypatch.setattr(bsl, name, kernels[kind])
    monkeypatch.setattr(bsl, "_LAUNCHES", {})
    monkeypatch.setattr(bsl, "LAUNCH_CACHE", True)
    monkeypatch.setattr(launch_ops, "_cacheable", lambda kernel: isinstance(kernel, FakeKernel))
    monkeypatch.setattr(launch_ops, "_device_and_stream", lambda: (0, 1234))
    return kernels


def counts(kernels, kinds=("forward", "grad_input", "grad_weight")):
    return {kind: (len(kernels[kind].jit), len(kernels[kind].compiled.runs)) for kind in kinds}


def fwd_bwd(layer, x):
    inputs = [t for t in (x, layer.values, layer.bias) if t is not None and t.requires_grad]
    y = layer(x)
    torch.autograd.grad(y, inputs, torch.ones_like(y))


def test_bsl_second_call_runs_the_compiled_kernels_with_the_jit_arguments(fake):
    layer = BlockSparseLinear(48, 40, block_size=16, backend="triton")
    x = torch.randn(2, 5, 48, requires_grad=True)
    fwd_bwd(layer, x)
    assert counts(fake) == {"forward": (1, 0), "grad_input": (1, 0), "grad_weight": (1, 0)}
    fwd_bwd(layer, x)
    fwd_bwd(layer, x)
    assert counts(fake) == {"forward": (1, 2), "grad_input": (1, 2), "grad_weight": (1, 2)}
    for kind in ("forward", "grad_input", "grad_weight"):
        assert_runs_repeat_the_jit_launch(fake[kind], ["num_warps", "num_stages"])
    # each plan holds its one compiled kernel
    assert [len(plan.compiled) for plan in bsl._LAUNCHES.values()] == [1, 1, 1]


def test_bsl_split_reduction_is_cached_too(fake):
    layer = BlockSparseLinear(48, 40, block_size=16, backend="triton")
    grad_y, x = torch.randn(64, 40), torch.randn(64, 48)
    for _ in range(3):
        bsl._triton_grad_weight(grad_y, x, layer.layout, 16, 16, True, split=2)
    assert counts(fake, ("grad_weight", "sum_splits")) == {"grad_weight": (1, 2), "sum_splits": (1, 2)}
    assert_runs_repeat_the_jit_launch(fake["sum_splits"], [])


def warm_layer(fake):
    """A layer and an input after two fwd+bwd: one JIT launch and one cached run per kernel."""
    layer = BlockSparseLinear(48, 40, block_size=16, backend="triton")
    x = torch.randn(5, 48, requires_grad=True)
    fwd_bwd(layer, x)
    fwd_bwd(layer, x)
    assert counts(fake) == {"forward": (1, 1), "grad_input": (1, 1), "grad_weight": (1, 1)}
    return layer, x


def test_bsl_a_new_specialisation_goes_through_the_jit(fake, monkeypatch):
    layer, x = warm_layer(fake)

    def delta(call, kinds=("forward", "grad_input", "grad_weight")):
        """(JIT launches, cached runs) that ``call()`` added, per kernel."""
        before = counts(fake, kinds)
        call()
        return {k: (j - before[k][0], r - before[k][1]) for k, (j, r) in counts(fake, kinds).items()}

    # a row stride of 49 instead of 48 (no longer divisible by 16): forward and grad weight
    # compile anew, grad input (dY is contiguous) runs cached; the next call is all cached
    wide = torch.randn(5, 49)[:, :48].requires_grad_(True)
    assert delta(lambda: fwd_bwd(layer, wide)) == {"forward": (1, 0), "grad_input": (0, 1), "grad_weight": (1, 0)}
    assert delta(lambda: fwd_bwd(layer, wide)) == {"forward": (0, 1), "grad_input": (0, 1), "grad_weight": (0, 1)}
    # a row stride of 1 (Triton makes it a constexpr), same shape
    overlapping = torch.randn(64).as_strided((5, 48), (1, 1))
    assert delta(lambda: layer(overlapping), ("forward",)) == {"forward": (1, 0)}
    # a pointer off 16-byte alignment: through the JIT every time, never cached
    shifted = torch.randn(5 * 48 + 1)[1:].view(5, 48).requires_grad_(True)
    assert shifted.data_ptr() % 16
    for _ in range(2):
        assert delta(lambda: fwd_bwd(layer, shifted)) == {"forward": (1, 0), "grad_input": (0, 1),
                                                          "grad_weight": (1, 0)}
    # another number of rows, dtype, spikes, no bias, a hand-made layout of int64 indices: new plans
    fp64 = BlockSparseLinear(48, 40, block_size=16, backend="triton", dtype=torch.float64)
    no_bias = BlockSparseLinear(48, 40, block_size=16, bias=False, backend="triton")
    layout64 = bsl.BlockLayout(*(t.to(torch.int64) for t in layer.layout))
    for call in (lambda: layer(torch.randn(7, 48)), lambda: fp64(torch.randn(5, 48, dtype=torch.float64)),
                 lambda: layer(torch.rand(5, 48) < 0.5), lambda: no_bias(x),
                 lambda: bsl.block_sparse_linear(x, layer.values, layout64, 40, layer.bias)):
        assert delta(call, ("forward",)) == {"forward": (1, 0)}
        assert delta(call, ("forward",)) == {"forward": (0, 1)}
    assert len(bsl._LAUNCHES) == 8  # 3 + 5 forward plans
    # Triton's debug setting changes the compile options
    monkeypatch.setattr(knobs.runtime, "debug", True)
    assert delta(lambda: fwd_bwd(layer, x)) == {"forward": (1, 0), "grad_input": (1, 0), "grad_weight": (1, 0)}
    # another current device
    monkeypatch.setattr(launch_ops, "_device_and_stream", lambda: (1, 99))
    assert delta(lambda: fwd_bwd(layer, x)) == {"forward": (1, 0), "grad_input": (1, 0), "grad_weight": (1, 0)}


def test_bsl_launch_hooks_and_the_switch_bypass_the_cache(fake, monkeypatch):
    layer, x = warm_layer(fake)
    with launch_hook():
        fwd_bwd(layer, x)
    assert counts(fake) == {"forward": (2, 1), "grad_input": (2, 1), "grad_weight": (2, 1)}
    fwd_bwd(layer, x)
    assert counts(fake) == {"forward": (2, 2), "grad_input": (2, 2), "grad_weight": (2, 2)}
    monkeypatch.setattr(bsl, "LAUNCH_CACHE", False)  # EFFST_BSL_LAUNCH_CACHE=0 / EFFST_LAUNCH_CACHE=0
    fwd_bwd(layer, x)
    assert counts(fake) == {"forward": (3, 2), "grad_input": (3, 2), "grad_weight": (3, 2)}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_bsl_cached_launches_equal_jit_launches_bit_for_bit(dtype, device, monkeypatch):
    """Forward, grad input, grad weight (one slice and, called directly, three slices plus the
    split reduction), for a contiguous input and one whose row stride is not a multiple of 16:
    cached launches give exactly the JIT's results, and no cached call reaches JITFunction.run."""
    torch.manual_seed(37)
    block_mask = torch.rand(6, 4) < 0.6
    layer = BlockSparseLinear.from_dense(torch.nn.Linear(128, 192), block_size=32, mask=block_mask)
    layer = layer.to(device=device, dtype=dtype)
    x = torch.randn(300, 128, device=device, dtype=dtype, requires_grad=True)
    strided = torch.randn(300, 136, device=device, dtype=dtype)[:, :128].requires_grad_(True)
    assert strided.stride(0) % 16 and strided.data_ptr() % 16 == 0  # cached, its own specialisation
    grad_y = torch.randn(300, 192, device=device, dtype=dtype)

    def run():
        out = []
        for inp in (x, strided):
            y = layer(inp)
            out += [y.detach(), *torch.autograd.grad(y, [inp, layer.values, layer.bias], grad_y)]
        out += bsl._triton_grad_weight(grad_y, x.detach(), layer.layout, 32, 32, True, split=3)
        return out

    jit_runs = []
    for name in BSL_KERNELS.values():
        kernel = getattr(bsl, name)
        original = kernel.run

        def counting(*args, _original=original, **kwargs):
            jit_runs.append(1)
            return _original(*args, **kwargs)
        monkeypatch.setattr(kernel, "run", counting)
    first = run()  # tunes, compiles (or loads) through the JIT and fills the plans' caches
    jit_before = len(jit_runs)
    cached = [run() for _ in range(3)]
    assert len(jit_runs) == jit_before, "a cached launch went through JITFunction.run"
    monkeypatch.setattr(bsl, "LAUNCH_CACHE", False)
    reference = run()
    assert len(jit_runs) > jit_before
    for results in [first, *cached]:
        for got, want in zip(results, reference):
            assert torch.equal(got, want)
