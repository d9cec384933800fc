"""Register / spill / shared-memory audit, for sm_90, of the Triton kernels at the configurations
their launchers use: block-sparse linear (forward, grad input, grad weight, at the block size the
pipeline uses, candidates read from the launcher's own list) and the fused routed neuron
(token_select) at its launch blocks and the longest T it unrolls.

Each kernel is compiled ahead of time (no GPU needed) in a subprocess (this process runs the
Triton interpreter) and ``cuobjdump -res-usage`` reads the cubin. A launched configuration must
keep everything in registers (no stack, no local memory: a spill is a trip to memory every loop
iteration) and fit the shared memory of one sm_90 block (227 KB; a bigger one fails to launch).
Checked: every untuned default (bf16 with float and uint8 spikes, fp32 with and without TF32,
fp64; it also runs under torch.compile and CUDA-graph capture) and the 2-byte candidates that
compile clean. Two 2-byte forward candidates with uint8 spikes and one grad-weight candidate
spill a little (48-544 B per thread, 2026-12-02 audit); they stay in the list because the
autotuner times them on the GPU and keeps the fastest, which a spill may or may not make them.
"""
import pytest
import torch
from aot_compile import resource_usage

from effst.ops import block_sparse_linear as bsl
from effst.ops import token_select as ts
from effst.ops.surrogates import SURROGATE_NAMES

SM90_MAX_SHARED = 232448  # bytes of shared memory one block may use on sm_90 (227 KB, opt-in)

_BSL = "effst.ops.block_sparse_linear"
_INDEX = {"group_ptr_ptr": "*i32", "group_col_ptr": "*i32", "group_tile_ptr": "*i32"}


def _bsl_entry(kind: str, dtype: str, block: tuple, candidate: int, tf32: bool = False, spikes: bool = False) -> dict:
    """Kernel ``kind`` of a 768 x 768 layer of ``block`` tiles in ``dtype`` ('bf16', 'fp32',
    'fp64'), launched with the launcher's autotune candidate number ``candidate``."""
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}[dtype]
    bm, bk = block
    rows = bsl.group_size(bm, -(-768 // bm))
    cols = bsl.group_size(bk, -(-768 // bk))
    width = (cols * bk) if kind == "grad_input" else rows * bm
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32  # the launcher's candidates may depend on TF32
    try:
        cfg = bsl._candidates(kind, width, bk, torch_dtype)[candidate]
        precision = bsl._input_precision(torch_dtype)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    p = f"*{dtype}"
    ints = {name: "i32" for name in ("M", "K", "N")}
    common = {"BM": bm, "BK": bk, "BLOCK_M": cfg.block_m, "ACC_DTYPE": "tl.float64" if dtype == "fp64" else "tl.float32",
              "INPUT_PRECISION": precision, "NUM_STAGES": cfg.num_stages}
    if kind == "forward":
        signature = {"x_ptr": "*u8" if spikes else p, "w_ptr": p, "b_ptr": p, "y_ptr": p, **_INDEX, **ints,
                     "stride_xm": "i32", "stride_ym": "i32", "num_groups": "i32", "num_tiles": "i32"}
        constexprs = dict(common, HAS_BIAS=True, GROUP=rows, EVEN_K=True)
        kernel, divisible = "_bsl_forward_kernel", ["K", "N", "stride_xm", "stride_ym"]
    elif kind == "grad_input":
        signature = {"dy_ptr": p, "w_ptr": p, "dx_ptr": p, "group_ptr_ptr": "*i32", "group_row_ptr": "*i32",
                     "group_tile_ptr": "*i32", **ints, "stride_dym": "i32", "stride_dxm": "i32",
                     "num_groups": "i32", "num_tiles": "i32"}
        constexprs = dict(common, GROUP=cols, EVEN_N=True)
        kernel, divisible = "_bsl_grad_input_kernel", ["K", "N", "stride_dym", "stride_dxm"]
    else:
        signature = {"dy_ptr": p, "x_ptr": "*u8" if spikes else p, "out_ptr": p, **_INDEX, "group_of_ptr": "*i32",
                     "chunk_ptr": "*i32", **ints, "stride_dym": "i32", "stride_xm": "i32", "bias_offset": "i32",
                     "rows_per_split": "i32", "split_stride": "i32"}
        constexprs = dict(common, HAS_DB=True, GROUP=rows, COLS=cols)
        kernel = "_bsl_grad_weight_kernel"
        divisible = ["K", "N", "stride_dym", "stride_xm", "bias_offset", "rows_per_split", "split_stride"]
    name = f"{kind} {dtype}{'/tf32' if tf32 else ''}{'/u8' if spikes else ''} {bm}x{bk} {tuple(cfg)[:3]}"
    return {"name": name, "module": _BSL, "kernel": kernel, "signature": signature, "constexprs": constexprs,
            "divisible_by_16": divisible, "options": {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}}


def _routed_backward_entry(x_dtype: str, surrogate: int) -> dict:
    """The routed neuron's backward at the longest T it unrolls (MAX_ROUTED_T), every option on,
    for a current of ``x_dtype`` (fp64: fp64 compute, else fp32)."""
    block_n, block_c = ts.ROUTED_BACKWARD_BLOCK_FP64 if x_dtype == "fp64" else ts.ROUTED_BACKWARD_BLOCK
    x, c = f"*{x_dtype}", "*fp64" if x_dtype == "fp64" else "*fp32"
    signature = {"grad_s_ptr": x, "grad_v_final_ptr": c, "x_ptr": x, "slot_ptr": "*i32"}
    signature.update({name: c for name in ("w_ptr", "theta_ptr", "v_init_ptr", "scalars_ptr")})
    signature["grad_x_ptr"] = x
    signature.update({name: c for name in ("grad_w_ptr", "grad_theta_ptr", "grad_v_init_ptr")})
    signature.update({name: "i32" for name in ("B", "N", "K", "C", "w_channels", "theta_channels")})
    constexprs = {"T": ts.MAX_ROUTED_T, "HAS_V_INIT": True, "HAS_GRAD_V_FINAL": True, "HARD_RESET": True,
                  "DECAY_INPUT": True, "DETACH_RESET": False, "SURROGATE": surrogate, "NEED_GRAD_W": True,
                  "NEED_GRAD_THETA": True, "COMPUTE_DTYPE": f"tl.float{c[-2:]}", "BLOCK_N": block_n,
                  "BLOCK_C": block_c}
    return {"name": f"routed backward {x_dtype} T{ts.MAX_ROUTED_T} surrogate {surrogate} {block_n}x{block_c}",
            "module": "effst.ops.token_select", "kernel": "_routed_neuron_backward_kernel", "signature": signature,
            "constexprs": constexprs, "divisible_by_16": ["C"], "options": {"num_warps": 4}}


DEFAULT = bsl.DEFAULT_BLOCK_SIZE
# (dtype, TF32, uint8 spikes): every input the launchers pick a separate default for
_VARIANTS = [("bf16", False, False), ("bf16", False, True), ("fp32", False, False), ("fp32", True, False),
             ("fp64", False, False)]
CASES = [
    # every untuned default (candidate 0): it also runs under torch.compile and CUDA-graph capture
    *(pytest.param(_bsl_entry(kind, dtype, DEFAULT, 0, tf32=tf32, spikes=spikes),
                   id=f"{kind}-{'tf32' if tf32 else dtype}{'-u8' if spikes else ''}-default")
      for kind in ("forward", "grad_input", "grad_weight") for dtype, tf32, spikes in _VARIANTS
      if not (spikes and kind == "grad_input")),  # (grad input never reads x)
    # 2-byte candidates that compile clean
    pytest.param(_bsl_entry("forward", "bf16", DEFAULT, 1), id="forward-bf16-cand1"),
    pytest.param(_bsl_entry("grad_input", "bf16", DEFAULT, 2), id="grad_input-bf16-cand2"),
    pytest.param(_routed_backward_entry("fp32", 0), id="routed-backward-fp32-sigmoid"),
    pytest.param(_routed_backward_entry("bf16", SURROGATE_NAMES.index("rect")), id="routed-backward-bf16-rect"),
    pytest.param(_routed_backward_entry("fp64", 0), id="routed-backward-fp64-sigmoid"),
]


@pytest.fixture(scope="module")
def usage() -> dict:
    return resource_usage([case.values[0] for case in CASES])


@pytest.mark.parametrize("entry", CASES)
def test_launched_configuration_keeps_to_registers_and_shared_memory(usage, entry):
    found = usage[entry["name"]]
    assert found["STACK"] == 0 and found["LOCAL"] == 0, found
    assert found["SHARED"] <= SM90_MAX_SHARED, found
