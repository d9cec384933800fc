"""The sLIF Triton kernels compile for sm_80 and sm_90 (no GPU needed).

The interpreter forgives what the compiler does not (constexpr misuse, dtype mixing, shapes);
this compiles the variants the launcher can request: every chunk length 1..MAX_CHUNK, every
surrogate, both resets, detach, decay_input, v_init / final-state gradient on and off, every
input dtype, and 64-bit strides for tensors past 2**31 elements.
"""
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

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
                           "COMPUTE_DTYPE": f"tl.float{compute[2:]}", "BLOCK": 1024}})
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
                           "COMPUTE_DTYPE": f"tl.float{compute[2:]}", "BLOCK": 512}})
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
