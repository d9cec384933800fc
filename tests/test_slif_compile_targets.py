"""The sLIF Triton kernels compile for sm_80 and sm_90 (no GPU needed).

The interpreter forgives what the compiler does not (constexpr misuse, dtype mixing, shapes);
this compiles the variants the launcher can request: every chunk length 1..MAX_CHUNK, every
surrogate, both resets, detach, decay_input, v_init / final-state gradient on and off, every
input dtype, both forward variants (PRELOAD), V_r folded or loaded (REST_IS_ZERO), and 64-bit
strides for tensors past 2**31 elements. The last test compiles launches as the JIT specialises
them for a large fp16 input and checks the generated code (registers, spills, load order).
"""
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
from aot_compile import resource_usage

from effst.ops.slif import MAX_CHUNK, chunk_size
from effst.ops.surrogates import SURROGATE_NAMES

AOT = Path(__file__).with_name("aot_compile.py")
X_DTYPES = ["fp16", "bf16", "fp32", "fp64"]


def _signature(pointers: list, x_dtype: str, compute: str, index_type: str,
               spike_type: str = None, with_row_len: bool = False) -> dict:
    signature = {}
    for name in pointers:
        signature[name] = f"*{x_dtype}" if name in ("x_ptr", "spikes_ptr", "grad_spikes_ptr", "grad_x_ptr") else f"*{compute}"
    if spike_type is not None and "spikes_ptr" in signature:
        signature["spikes_ptr"] = spike_type
    ints = ["T", "N", "stride_xt"] + (["row_len"] if with_row_len else [])
    for name in ints + ["w_channels", "w_inner", "theta_channels", "theta_inner"]:
        signature[name] = index_type if name in ("N", "stride_xt", "row_len") else "i32"
    return signature


def variants(arch: int) -> list:
    chunks = sorted({chunk_size(T) for T in range(1, 3 * MAX_CHUNK)})
    assert chunks == list(range(1, MAX_CHUNK + 1))
    entries = []
    flags = list(itertools.product([False, True], repeat=3))
    for i, chunk in enumerate(chunks):
        x_dtype = X_DTYPES[i % len(X_DTYPES)]
        compute = "fp64" if x_dtype == "fp64" else "fp32"
        index_type = "i64" if i % 3 == 2 else "i32"
        has_v_init, hard_reset, decay_input = flags[i % len(flags)]
        entries.append({
            "module": "effst.ops.slif", "kernel": "slif_forward_kernel", "arch": arch,
            "signature": _signature(["x_ptr", "spikes_ptr", "w_ptr", "theta_ptr", "v_init_ptr",
                                     "v_final_ptr", "checkpoint_ptr", "scalars_ptr"],
                                    x_dtype, compute, index_type,
                                    # spike_dtype: x's dtype, uint8 or bool (i1)
                                    spike_type=[None, "*u8", "*i1"][i % 3]),
            "constexprs": {"HAS_V_INIT": has_v_init, "HARD_RESET": hard_reset,
                           "DECAY_INPUT": decay_input, "CHUNK": chunk,
                           "COMPUTE_DTYPE": f"tl.float{compute[2:]}", "BLOCK": 1024,
                           # both forward variants, V_r folded (0) or loaded
                           "PRELOAD": i % 2 == 1, "REST_IS_ZERO": i % 4 < 2}})
    for i, surrogate in enumerate(SURROGATE_NAMES):
        chunk = chunks[(3 * i) % len(chunks)]
        x_dtype = X_DTYPES[i % len(X_DTYPES)]
        compute = "fp64" if x_dtype == "fp64" else "fp32"
        has_v_init, hard_reset, detach = flags[i % len(flags)]
        entries.append({
            "module": "effst.ops.slif", "kernel": "slif_backward_kernel", "arch": arch,
            "signature": _signature(["grad_spikes_ptr", "grad_v_final_ptr", "x_ptr", "w_ptr",
                                     "theta_ptr", "v_init_ptr", "checkpoint_ptr", "scalars_ptr",
                                     "grad_x_ptr", "grad_w_ptr", "grad_theta_ptr",
                                     "grad_v_init_ptr"], x_dtype, compute,
                                    "i64" if i % 4 == 3 else "i32", with_row_len=True),
            "constexprs": {"HAS_V_INIT": has_v_init, "HAS_GRAD_V_FINAL": not has_v_init,
                           "HARD_RESET": hard_reset, "DECAY_INPUT": i % 2 == 0,
                           "DETACH_RESET": detach, "SURROGATE": i,
                           # which gradients are wanted, and partial or per-neuron parameters
                           "NEED_GRAD_X": i % 3 != 2, "NEED_GRAD_W": i % 2 == 0,
                           "NEED_GRAD_THETA": i % 4 != 1, "W_PARTIAL": i % 3 == 0,
                           "THETA_PARTIAL": i % 2 == 1, "CHUNK": chunk,
                           "COMPUTE_DTYPE": f"tl.float{compute[2:]}", "BLOCK": 512,
                           "REST_IS_ZERO": i % 3 == 1}})
    return entries


@pytest.mark.parametrize("arch", [80, 90])
def test_slif_kernels_compile_for_gpu(arch):
    entries = variants(arch)
    proc = subprocess.run([sys.executable, str(AOT), json.dumps(entries)], capture_output=True,
                          text=True, timeout=1200)
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    failures = [r for r in results if not r["ok"]]
    assert not failures, json.dumps(failures, indent=1)
    assert len(results) == len(entries), proc.stderr[-3000:]
    assert all(r["ptx_bytes"] > 1000 for r in results)


# What a real launch on x = [T, 64 * 65536] specialises (Triton's JIT: 16-byte aligned pointers,
# integers divisible by 16, integers equal to 1 folded) and what the compiled code then looks
# like. Without the specialisation the compiler cannot vectorise, so the entries above say
# nothing about load widths, registers or spills. tests/aot_compile.py compiles them and reads
# the cubin.
def _real_launch(kernel: str, x_dtype: str, constexprs: dict, num_warps: int, name: str) -> dict:
    """fp16 x, per-layer parameters (channels == 1), N = 64 * 65536, hard reset to 0."""
    if kernel == "slif_forward_kernel":
        pointers = ["x_ptr", "spikes_ptr", "w_ptr", "theta_ptr", "v_init_ptr", "v_final_ptr",
                    "checkpoint_ptr", "scalars_ptr"]
        ints, row = ["T", "N", "stride_xt"], False
    else:
        pointers = ["grad_spikes_ptr", "grad_v_final_ptr", "x_ptr", "w_ptr", "theta_ptr",
                    "v_init_ptr", "checkpoint_ptr", "scalars_ptr", "grad_x_ptr", "grad_w_ptr",
                    "grad_theta_ptr", "grad_v_init_ptr"]
        ints, row = ["T", "N", "stride_xt"], True
    # w_channels / theta_channels == 1: folded by the JIT (equal_to_1). They stay in the
    # signature so every argument keeps its position (the divisibility hints are positional).
    signature = _signature(pointers, x_dtype, "fp32", "i32", with_row_len=row)
    return {"name": name, "module": "effst.ops.slif", "kernel": kernel, "signature": signature, "constexprs": constexprs,
            "options": {"num_warps": num_warps}, "equal_to_1": ["w_channels", "theta_channels"],
            "divisible_by_16": ints[1:] + (["row_len"] if row else []) + ["w_inner", "theta_inner"]}


def test_real_launches_do_not_spill_and_preload_issues_loads_first():
    from effst.ops import slif as slif_ops

    # forward at 1024 per 4 warps = 8 fp16 per thread (16-byte loads), where x's register
    # layout differs from V's (fp32, 4 per thread); backward at the module's launch parameters
    forward = {"HAS_V_INIT": False, "HARD_RESET": True, "DECAY_INPUT": True, "CHUNK": 8,
               "COMPUTE_DTYPE": "tl.float32", "BLOCK": 1024, "REST_IS_ZERO": True}
    backward = {"HAS_V_INIT": False, "HAS_GRAD_V_FINAL": False, "HARD_RESET": True,
                "DECAY_INPUT": True, "DETACH_RESET": False, "SURROGATE": 1, "NEED_GRAD_X": True,
                "NEED_GRAD_W": True, "NEED_GRAD_THETA": True, "W_PARTIAL": True,
                "THETA_PARTIAL": True, "CHUNK": slif_ops.MAX_CHUNK, "COMPUTE_DTYPE": "tl.float32",
                "BLOCK": slif_ops.BACKWARD_BLOCK, "REST_IS_ZERO": True}
    entries = [
        _real_launch("slif_forward_kernel", "fp16", dict(forward, PRELOAD=False), 4, "forward"),
        _real_launch("slif_forward_kernel", "fp16", dict(forward, PRELOAD=True), 4,
                     "forward preload"),
        _real_launch("slif_backward_kernel", "fp16", backward, slif_ops.BACKWARD_WARPS,
                     "backward"),
    ]
    found = resource_usage(entries, sass=True)
    summary = {name: {"regs": r["REG"], "stack": r["STACK"], "local": r["LOCAL"],
                      "barriers": r["ops"].count("BAR.SYNC.DEFER_BLOCKING")}
               for name, r in found.items()}
    for name, r in found.items():  # everything stays in registers: no spills
        assert r["STACK"] == 0 and r["LOCAL"] == 0, summary
    # x arrives in 16-byte loads, one per step
    loads = [i for i, op in enumerate(found["forward preload"]["ops"]) if op == "LDG.E.128"]
    stores = [i for i, op in enumerate(found["forward preload"]["ops"]) if op.startswith("STG")]
    assert len(loads) == 8, summary
    # the preload variant issues all of the chunk's x loads before its first spike store, and
    # moves V through shared memory at most at the chunk boundaries, not every step
    assert not [i for i in stores if loads[0] < i < loads[-1]], summary
    assert summary["forward preload"]["barriers"] < summary["forward"]["barriers"], summary
