"""The block-sparse kernels compile ahead of time for sm_80 and sm_90 (no GPU needed).

Triton's interpreter replaces ``@triton.jit`` functions, so compilation runs in subprocesses
started without ``TRITON_INTERPRET`` (one per architecture, side by side).
"""
import os
import subprocess
import sys
import textwrap

_COMPILE_SCRIPT = textwrap.dedent(
    """
    import sys
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from effst.ops import block_sparse_linear as bsl

    target = GPUTarget("cuda", int(sys.argv[1]), 32)
    # (weight dtype, activation dtype, accumulator, fp32 precision, block, M tile, even sizes):
    # every dtype path, every block side the tests use, both masking variants and the M tiles
    # the launchers pick. Spike inputs are uint8 (bool is viewed as uint8 before launch).
    cases = [("fp32", "fp32", tl.float32, "ieee", (32, 32), 128, True),
             ("fp32", "fp32", tl.float32, "tf32", (16, 64), 16, False),
             ("bf16", "bf16", tl.float32, "ieee", (64, 64), 128, True),
             ("bf16", "bf16", tl.float32, "ieee", (16, 16), 32, False),
             ("fp16", "fp16", tl.float32, "ieee", (32, 32), 128, False),
             ("bf16", "u8", tl.float32, "ieee", (32, 32), 128, True),
             ("fp16", "u8", tl.float32, "ieee", (64, 32), 64, False),
             ("fp32", "u8", tl.float32, "ieee", (16, 16), 128, True),
             ("fp64", "fp64", tl.float64, "ieee", (32, 32), 64, True)]


    def compile_kernel(fn, pointers_and_ints, consts, bm, bk):
        signature = dict(pointers_and_ints)
        signature.update({name: "constexpr" for name in consts})
        options = {"num_warps": bsl._num_warps(bm, bk), "num_stages": 3}
        return triton.compile(ASTSource(fn, signature, consts), target=target, options=options)


    compiled = 0
    for w_ty, x_ty, acc, precision, (bm, bk), block_m, even in cases:
        acc_ty = "fp64" if acc == tl.float64 else "fp32"
        common = dict(BM=bm, BK=bk, ACC_DTYPE=acc, INPUT_PRECISION=precision)
        compile_kernel(bsl._bsl_forward_kernel, {
            "x_ptr": "*" + x_ty, "w_ptr": "*" + w_ty, "b_ptr": "*" + w_ty, "y_ptr": "*" + w_ty,
            "row_ptr_ptr": "*i32", "col_idx_ptr": "*i32", "M": "i32", "K": "i32", "N": "i32",
            "stride_xm": "i64", "stride_ym": "i64", "num_block_rows": "i32",
        }, dict(common, HAS_BIAS=True, BLOCK_M=block_m, EVEN_K=even), bm, bk)
        compile_kernel(bsl._bsl_grad_weight_kernel, {
            "dy_ptr": "*" + w_ty, "x_ptr": "*" + x_ty, "partial_ptr": "*" + acc_ty,
            "db_partial_ptr": "*" + acc_ty, "row_ptr_ptr": "*i32",
            "row_idx_ptr": "*i32", "col_idx_ptr": "*i32", "M": "i32", "K": "i32", "N": "i32",
            "stride_dym": "i64", "stride_xm": "i64", "nnz": "i32", "n_padded": "i32", "rows_per_split": "i32",
        }, dict(common, HAS_DB=even, BLOCK_M=min(block_m, 64)), bm, bk)
        compiled += 2
        if x_ty != "u8":  # spike inputs get no input gradient
            compile_kernel(bsl._bsl_grad_input_kernel, {
                "dy_ptr": "*" + w_ty, "w_ptr": "*" + w_ty, "dx_ptr": "*" + w_ty,
                "col_ptr_ptr": "*i32", "csc_row_idx_ptr": "*i32", "csc_perm_ptr": "*i32",
                "M": "i32", "K": "i32", "N": "i32", "stride_dym": "i64", "stride_dxm": "i64",
                "num_block_cols": "i32",
            }, dict(common, BLOCK_M=block_m, EVEN_N=even), bm, bk)
            compiled += 1
    print("compiled", compiled)
    """
)


def test_block_sparse_kernels_compile_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = {
        arch: subprocess.Popen(
            [sys.executable, "-c", _COMPILE_SCRIPT, str(arch)], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for arch in (80, 90)
    }
    for arch, proc in procs.items():
        out, err = proc.communicate(timeout=1200)
        assert proc.returncode == 0, f"sm_{arch}: {err[-4000:]}"
        assert "compiled 24" in out, f"sm_{arch}: {out}"
