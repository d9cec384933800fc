"""What the sLIF launcher really passes compiles for sm_90 and sm_80.

tests/test_slif_compile_targets.py compiles hand-written signatures; this test records the
launches the launcher itself makes (argument dtypes, placeholders for absent tensors, integer
widths, constexprs, num_warps) over dtypes, sequence lengths and options, and compiles exactly
those. It exists because a placeholder of x's dtype passed for the unused checkpoint pointer
(T <= CHUNK, half precision) type-checked in the interpreter but not in the compiler.
"""
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton.language as tl

import effst
from effst.ops import slif as slif_ops

AOT = Path(__file__).with_name("aot_compile.py")
TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
                torch.float64: "fp64", torch.uint8: "u8", torch.bool: "i1",
                torch.int32: "i32", torch.int64: "i64"}


def _constexpr_json(value):
    """Triton dtypes travel as "tl.<name>" strings (tests/aot_compile.py turns them back)."""
    if isinstance(value, tl.dtype):
        return next(f"tl.{name}" for name in ("float16", "bfloat16", "float32", "float64",
                                              "uint8", "int1", "int32", "int64")
                    if getattr(tl, name) == value)
    return value


class LaunchRecorder:
    """Stands in for a @triton.jit kernel: ``kernel[grid](*args, **kwargs)`` records the call."""

    def __init__(self, kernel):
        self.name = kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__
        parameters = inspect.signature(getattr(kernel, "fn", kernel)).parameters
        self.arg_names = list(parameters)
        self.launches = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            options = {"num_warps": kwargs.pop("num_warps")} if "num_warps" in kwargs else {}
            signature = {}
            for name, value in zip(self.arg_names, args):
                if isinstance(value, torch.Tensor):
                    signature[name] = "*" + TRITON_TYPES[value.dtype]
                elif isinstance(value, bool):
                    signature[name] = "i1"
                elif isinstance(value, int):
                    signature[name] = "i64" if abs(value) >= 2 ** 31 else "i32"
                elif isinstance(value, float):
                    signature[name] = "fp32"
                else:
                    raise TypeError(f"{self.name}: unexpected argument {name}={value!r}")
            constexprs = {name: _constexpr_json(value) for name, value in kwargs.items()}
            self.launches.append({"module": "effst.ops.slif", "kernel": self.name,
                                  "signature": signature, "constexprs": constexprs,
                                  "options": options})
        return launch


def recorded_launches(monkeypatch) -> list:
    forward = LaunchRecorder(slif_ops.slif_forward_kernel)
    backward = LaunchRecorder(slif_ops.slif_backward_kernel)
    monkeypatch.setattr(slif_ops, "slif_forward_kernel", forward)
    monkeypatch.setattr(slif_ops, "slif_backward_kernel", backward)
    cases = [  # (dtype, T, per-channel parameters, v_reset, v_init, return_state)
        (torch.float16, 4, True, 0.0, False, False),
        (torch.bfloat16, 8, False, None, True, True),
        (torch.float16, 20, True, None, False, True),
        (torch.bfloat16, 3, True, 0.0, True, False),
        (torch.float32, 1, False, 0.0, False, True),
        (torch.float32, 17, True, None, True, False),
        (torch.float64, 5, True, -0.3, False, False),
    ]
    # the forward's preload variant (EFFST_SLIF_FORWARD_PRELOAD=1) on the first three cases
    for case_number, (dtype, T, per_channel, v_reset, with_v_init, return_state) in enumerate(
            cases + cases[:3]):
        monkeypatch.setattr(slif_ops, "FORWARD_PRELOAD", case_number >= len(cases))
        x = torch.zeros(T, 2, 8, dtype=dtype, requires_grad=True)
        shape = (8,) if per_channel else ()
        w = torch.zeros(shape, dtype=dtype, requires_grad=True)
        theta = torch.ones(shape, dtype=dtype, requires_grad=True)
        out = effst.slif(x, w, theta, v_reset=v_reset, backend="triton",
                         v_init=0.25 if with_v_init else None, return_state=return_state)
        loss = (out[0].sum() + out[1].sum()) if return_state else out.sum()
        loss.backward()
    for spike_dtype in (torch.uint8, torch.bool):  # inference spikes as bytes
        effst.slif(torch.zeros(4, 16, dtype=torch.float16), 0.0, 1.0, backend="triton",
                   spike_dtype=spike_dtype)
    unique = {json.dumps(entry, sort_keys=True): entry
              for entry in forward.launches + backward.launches}
    assert {entry["kernel"] for entry in unique.values()} == {"slif_forward_kernel",
                                                              "slif_backward_kernel"}
    # both forward variants and both ways of getting V_r (folded 0, loaded -0.3 / soft) compile
    assert {e["constexprs"]["PRELOAD"] for e in forward.launches} == {False, True}
    assert {e["constexprs"]["REST_IS_ZERO"] for e in backward.launches} == {False, True}
    # per-layer parameters take the row grid, channel-last ones the tiled backward
    assert {e["constexprs"]["TILE_ROWS"] for e in backward.launches} == {
        0, slif_ops.BACKWARD_BLOCK // slif_ops.TILE_COLUMNS}
    return list(unique.values())


@pytest.mark.parametrize("arch", [90, 80])
def test_launched_slif_kernels_compile_for_gpu(arch, monkeypatch):
    entries = [dict(entry, arch=arch) for entry in recorded_launches(monkeypatch)]
    proc = subprocess.run([sys.executable, str(AOT), json.dumps(entries)], capture_output=True,
                          text=True, timeout=1200)
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    failures = [r for r in results if not r["ok"]]
    assert not failures, json.dumps(failures, indent=1)[:6000]
    assert len(results) == len(entries), proc.stderr[-3000:]


def test_tiled_backward_real_launch_does_not_spill():
    # The tiled backward as the JIT specialises it for x = [T, 64, 65536] fp16 with channel-last
    # w and V_th (channels = 65536 divisible by 16, inner = 1 folded): no spills, and at most 128
    # registers per thread, so 4 programs of 4 warps fit an SM, as for the row-grid backward
    # (124; the tiled one: 124 today). (Looping one program over several tiles cost 162: 3.)
    from aot_compile import resource_usage
    from test_slif_compile_targets import _real_launch

    constexprs = {"HAS_V_INIT": False, "HAS_GRAD_V_FINAL": False, "HARD_RESET": True,
                  "DECAY_INPUT": True, "DETACH_RESET": False, "SURROGATE": 1,
                  "NEED_GRAD_X": True, "NEED_GRAD_W": True, "NEED_GRAD_THETA": True,
                  "W_PARTIAL": True, "THETA_PARTIAL": True, "CHUNK": slif_ops.MAX_CHUNK,
                  "COMPUTE_DTYPE": "tl.float32", "BLOCK": slif_ops.TILE_COLUMNS,
                  "REST_IS_ZERO": True,
                  "TILE_ROWS": slif_ops.BACKWARD_BLOCK // slif_ops.TILE_COLUMNS}
    entry = _real_launch("slif_backward_kernel", "fp16", constexprs, slif_ops.BACKWARD_WARPS,
                         "tiled backward")
    # every integer stays in the signature, in the kernel's order (the script numbers the
    # divisibility hints by signature position); equal_to_1 turns the inners into constexprs
    signature = dict(entry["signature"], w_channels="i32", theta_channels="i32")
    names = list(inspect.signature(slif_ops.slif_backward_kernel.fn).parameters)
    entry.update(signature={n: signature[n] for n in names if n in signature},
                 equal_to_1=["w_inner", "theta_inner"],
                 divisible_by_16=["N", "stride_xt", "row_len", "w_channels", "theta_channels"])
    found = resource_usage([entry], sass=True)["tiled backward"]
    summary = {key: found[key] for key in ("REG", "STACK", "LOCAL")}
    assert found["STACK"] == 0 and found["LOCAL"] == 0, summary
    assert found["REG"] <= 128, summary
    assert "LDG.E.64" in found["ops"], summary  # 4 fp16 per load: the columns are contiguous
