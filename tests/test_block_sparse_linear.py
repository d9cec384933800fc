"""BlockSparseLinear and its kernels against a float64 dense masked reference.

On the CPU the Triton kernels run under TRITON_INTERPRET=1 (set by conftest), so sizes are
small; with EFFST_TEST_DEVICE=cuda the same tests run the compiled kernels. The reference is
built here from the dense weight and the block mask (repeat_interleave), independently of the
layout code under test.
"""
import math

import pytest
import torch
from torch import nn

from effst.nn.block_sparse import BlockSparseLinear
from effst.ops.block_sparse_linear import block_sparse_linear, blocks_to_dense, build_block_layout, check_block_size

TOL = {  # (rtol, atol relative to the reference's max magnitude): the output's rounding, a few ulps
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1e-2, 1e-2),
}


def element_mask(block_mask, block, out_features, in_features):
    bm, bk = block
    full = block_mask.repeat_interleave(bm, 0).repeat_interleave(bk, 1)
    return full[:out_features, :in_features]


def random_block_mask(out_features, in_features, block, density, generator, empty_rows=()):
    grid = (math.ceil(out_features / block[0]), math.ceil(in_features / block[1]))
    mask = torch.rand(grid, generator=generator) < density
    for r in empty_rows:
        mask[r] = False
    return mask


def make_layer(in_features, out_features, block, block_mask, dtype, device, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(out_features, in_features, generator=g, dtype=torch.float64)
    linear = nn.Linear(in_features, out_features, bias=bias).to(torch.float64)
    with torch.no_grad():
        linear.weight.copy_(dense)
        if bias:
            linear.bias.copy_(torch.randn(out_features, generator=g, dtype=torch.float64))
    layer = BlockSparseLinear.from_dense(linear, block_size=block, mask=block_mask).to(device=device, dtype=dtype)
    keep = element_mask(block_mask, block, out_features, in_features)
    # The reference uses the weights as the layer holds them (rounded to its dtype).
    weight = (dense * keep).to(dtype).to(torch.float64)
    return layer, weight, (linear.bias.detach().to(dtype).to(torch.float64) if bias else None), keep


def reference(x, weight, bias, grad_y):
    """float64 dense masked reference: output and gradients w.r.t. x, dense W and b."""
    x64 = x.detach().to(torch.float64).requires_grad_(x.is_floating_point())
    w64 = weight.detach().clone().requires_grad_()
    b64 = bias.detach().clone().requires_grad_() if bias is not None else None
    y = x64 @ w64.t()
    if b64 is not None:
        y = y + b64
    y.backward(grad_y.to(torch.float64))  # callers pass grad_y rounded to the layer dtype
    return y.detach(), (x64.grad if x.is_floating_point() else None), w64.grad, (b64.grad if b64 is not None else None)


def tiles_of(dense_grad, block_mask, block):
    """Reference gradient of the kept tiles, row-ordered, from the dense weight gradient."""
    bm, bk = block
    nbr, nbc = block_mask.shape
    padded = torch.zeros(nbr * bm, nbc * bk, dtype=dense_grad.dtype)
    padded[: dense_grad.shape[0], : dense_grad.shape[1]] = dense_grad
    out = [padded[r * bm:(r + 1) * bm, c * bk:(c + 1) * bk] for r in range(nbr) for c in range(nbc) if block_mask[r, c]]
    return torch.stack(out) if out else torch.zeros(0, bm, bk, dtype=dense_grad.dtype)


def assert_close(actual, expected, dtype, what):
    rtol, atol = TOL[dtype]
    scale = max(expected.abs().max().item(), 1.0) if expected.numel() else 1.0
    torch.testing.assert_close(actual.detach().cpu().to(torch.float64), expected.to(torch.float64),
                               rtol=rtol, atol=atol * scale, msg=lambda m: f"{what}: {m}")


def assert_layer_matches_reference(layer, x, y, grad_y, weight, bias, block_mask, block, dtype):
    """After ``y = layer(x)`` and ``y.backward(grad_y)``: y and the gradients of x, the kept
    tiles and the bias against the float64 reference; returns the reference dense weight grad."""
    y_ref, gx_ref, gw_ref, gb_ref = reference(x.detach().cpu(), weight, bias, grad_y)
    assert_close(y, y_ref, dtype, "y")
    assert_close(x.grad, gx_ref, dtype, "grad x")
    assert_close(layer.values.grad, tiles_of(gw_ref, block_mask, block), dtype, "grad values")
    assert_close(layer.bias.grad, gb_ref, dtype, "grad bias")
    return gw_ref


CASES = [
    # id, x shape (last = in), out, block, density, empty block rows, dtype
    ("TBNC-16-odd", (2, 2, 3, 40), 70, (16, 16), 0.6, (1,), torch.float32),
    ("2d-32-odd", (37, 50), 45, (32, 32), 0.7, (), torch.float32),
    ("rect-16x64", (3, 5, 70), 33, (16, 64), 0.8, (0,), torch.float32),
    ("64-fp16", (2, 9, 72), 100, (64, 64), 0.5, (), torch.float16),
    ("32-fp64", (4, 3, 64), 64, (32, 32), 0.5, (), torch.float64),
    ("128x64-odd", (2, 5, 130), 140, (128, 64), 0.7, (), torch.float32),
    ("many-groups-16", (3, 11, 200), 300, (16, 16), 0.3, (2, 9), torch.float32),
    ("128-square-odd", (2, 3, 150), 140, (128, 128), 0.75, (), torch.float32),
    ("rect-64x16", (3, 4, 40), 100, (64, 16), 0.6, (1,), torch.float32),
    ("rect-32x128-fp16", (2, 5, 130), 70, (32, 128), 0.7, (), torch.float16),
    ("dense", (2, 7, 48), 40, (16, 16), 1.0, (), torch.float32),
    ("all-pruned", (2, 6, 48), 40, (16, 16), 0.0, (), torch.float32),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_forward_and_gradients_match_dense_masked_reference(case, backend, device):
    _, x_shape, out_features, block, density, empty_rows, dtype = case
    in_features = x_shape[-1]
    g = torch.Generator().manual_seed(1)
    block_mask = random_block_mask(out_features, in_features, block, density, g, empty_rows)
    layer, weight, bias, keep = make_layer(in_features, out_features, block, block_mask, dtype, device)
    layer.backend = backend
    x = torch.randn(x_shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_()
    y = layer(x)
    assert y.shape == (*x_shape[:-1], out_features) and y.dtype == dtype
    grad_y = torch.randn(y.shape, generator=g, dtype=torch.float64).to(dtype)
    y.backward(grad_y.to(device=device))
    gw_ref = assert_layer_matches_reference(layer, x, y, grad_y, weight, bias, block_mask, block, dtype)
    # The dense view of the gradient is zero off the kept tiles (gradient on kept blocks only).
    assert layer.values.grad.shape == (int(block_mask.sum()), *block)
    dense_grad = blocks_to_dense(layer.values.grad.detach().cpu(), block_mask, out_features, in_features)
    assert not dense_grad[~keep].any()
    assert_close(dense_grad, gw_ref * keep, dtype, "dense view of grad values")


BLOCKS = [(16, 16), (32, 32), (64, 64), (128, 128), (32, 64), (64, 128), (128, 32), (16, 128)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("block", BLOCKS, ids=[f"{b[0]}x{b[1]}" for b in BLOCKS])
def test_every_block_size_and_dtype_matches_reference(block, dtype, device):
    """Every supported tile side, square and rectangular, in fp32 and fp16 (bf16 is checked on
    the GPU only: the interpreter's bf16 dots are not reliable): forward, grad input, grad
    weight and bias grad against the float64 reference built from the weights rounded to the
    layer dtype. Shapes are not multiples of the tile (edge tiles padded), span several block
    groups in both directions, and one block-row keeps nothing."""
    bm, bk = block
    out_features, in_features = 128 + bm + bm // 2 + 3, 128 + bk + bk // 2 + 5
    g = torch.Generator().manual_seed(20 + bm + bk)
    block_mask = random_block_mask(out_features, in_features, block, 0.5, g, empty_rows=(1,))
    layout = build_block_layout(block_mask, block)
    assert layout.row_group_ptr.numel() > 2 and layout.col_group_ptr.numel() > 2  # several groups each way
    layer, weight, bias, _ = make_layer(in_features, out_features, block, block_mask, dtype, device)
    x = torch.randn(3, 23, in_features, generator=g, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_()
    y = layer(x)
    grad_y = torch.randn(y.shape, generator=g, dtype=torch.float64).to(dtype)
    y.backward(grad_y.to(device=device))
    assert y.dtype == x.grad.dtype == layer.values.grad.dtype == layer.bias.grad.dtype == dtype
    assert_layer_matches_reference(layer, x, y, grad_y, weight, bias, block_mask, block, dtype)


@pytest.mark.parametrize("density", [0.6, 1.0], ids=["sparse", "dense-every-tile"])
@pytest.mark.parametrize("spike_dtype", [torch.bool, torch.uint8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_spike_inputs_read_as_bytes(spike_dtype, dtype, density, device):
    """Sparse layers and the dense path (every tile kept) read bool/uint8 spikes directly."""
    g = torch.Generator().manual_seed(2)
    block = (16, 32)
    block_mask = random_block_mask(50, 70, block, density, g)
    layer, weight, bias, _ = make_layer(70, 50, block, block_mask, dtype, device)
    spikes = torch.rand(3, 4, 70, generator=g) < 0.3
    x = spikes.to(spike_dtype).to(device)
    y = layer(x)
    grad_y = torch.randn(y.shape, generator=g, dtype=torch.float64).to(dtype)
    y.backward(grad_y.to(device=device))
    y_ref, _, gw_ref, gb_ref = reference(spikes.to(torch.float64), weight, bias, grad_y)
    assert_close(y, y_ref, dtype, "y")
    assert_close(layer.values.grad, tiles_of(gw_ref, block_mask, block), dtype, "grad values")
    # Same result as the widened float input, bit for bit.
    torch.testing.assert_close(y, layer(spikes.to(device=device, dtype=dtype)), rtol=0, atol=0)


def test_non_contiguous_input_and_no_bias(device):
    g = torch.Generator().manual_seed(3)
    block = (16, 16)
    block_mask = random_block_mask(24, 40, block, 0.5, g)
    layer, weight, _, _ = make_layer(40, 24, block, block_mask, torch.float32, device, bias=False)
    base = torch.randn(40, 6, 5, generator=g, dtype=torch.float64)
    x = base.to(device=device, dtype=torch.float32).permute(2, 1, 0).requires_grad_()  # [5, 6, 40], stride(-1) != 1
    assert not x.is_contiguous()
    y = layer(x)
    grad_y = torch.randn(y.shape, generator=g, dtype=torch.float64)
    y.backward(grad_y.to(device=device, dtype=torch.float32))
    y_ref, gx_ref, gw_ref, _ = reference(base.permute(2, 1, 0), weight, None, grad_y)
    assert_close(y, y_ref, torch.float32, "y")
    assert_close(x.grad, gx_ref, torch.float32, "grad x")
    assert_close(layer.values.grad, tiles_of(gw_ref, block_mask, block), torch.float32, "grad values")


def test_deterministic_gradients(device):
    g = torch.Generator().manual_seed(4)
    block = (16, 16)
    layer, _, _, _ = make_layer(48, 32, block, random_block_mask(32, 48, block, 0.7, g), torch.float32, device)
    x = torch.randn(3, 20, 48, generator=g).to(device)
    grads = []
    for _ in range(2):
        layer.zero_grad()
        layer(x).square().sum().backward()
        grads.append(layer.values.grad.clone())
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("split", [1, 3])
def test_grad_weight_split_reduction_and_fused_bias(split, device):
    """The GPU cuts each tile's M reduction into slices (summed after); the bias gradient is
    summed from the same dY tiles, block-rows without kept tiles separately."""
    from effst.ops import block_sparse_linear as bsl

    g = torch.Generator().manual_seed(8)
    block_mask = random_block_mask(40, 48, (16, 16), 0.6, g, empty_rows=(1,))
    layout = build_block_layout(block_mask.to(device), (16, 16))
    grad_y = torch.randn(140, 40, generator=g).to(device)
    x = (torch.rand(140, 48, generator=g) < 0.5).to(torch.uint8).to(device)
    got, got_bias = bsl._triton_grad_weight(grad_y, x, layout, 16, 16, True, split=split)
    assert got.dtype == got_bias.dtype == grad_y.dtype
    dense = grad_y.double().cpu().t() @ x.double().cpu()
    assert_close(got, tiles_of(dense, block_mask, (16, 16)), torch.float32, "grad values")
    assert_close(got_bias, grad_y.double().cpu().sum(0), torch.float32, "grad bias")


def test_layout_row_and_column_order():
    mask = torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 0]], dtype=torch.bool)
    layout = build_block_layout(mask)
    assert layout.row_ptr.tolist() == [0, 2, 2, 4]
    assert layout.col_idx.tolist() == [0, 2, 0, 1]
    assert layout.row_idx.tolist() == [0, 0, 2, 2]
    assert layout.col_ptr.tolist() == [0, 2, 3, 4]
    assert layout.csc_row_idx.tolist() == [0, 2, 2, 0]
    # value index (row order) of each tile in column order: (0,0)->0, (2,0)->2, (2,1)->3, (0,2)->1
    assert layout.csc_perm.tolist() == [0, 2, 3, 1]
    assert all(t.dtype == torch.int32 for t in layout)
    # Block-rows in groups of 2 (2 x 64 = 128 output columns): group 0 = rows {0, 1} keeps
    # columns 0 and 2; group 1 = rows {2, (padding)} keeps columns 0 and 1.
    grouped = build_block_layout(mask, (64, 16))
    assert grouped.row_group_ptr.tolist() == [0, 2, 4]
    assert grouped.row_group_col.tolist() == [0, 2, 0, 1]
    assert grouped.row_group_tile.tolist() == [[0, -1], [1, -1], [2, -1], [3, -1]]
    assert grouped.row_group_of.tolist() == [0, 0, 1, 1]
    # Block-columns in groups of 4 (16 x 4 >= 3 columns, next power of two): one group, rows 0 and 2.
    assert grouped.col_group_ptr.tolist() == [0, 2]
    assert grouped.col_group_row.tolist() == [0, 2]
    assert grouped.col_group_tile.tolist() == [[0, -1, 1, -1], [2, 3, -1, -1]]
    # dW programs take 4 entries (the column group width) of a row group: one per row group here.
    assert grouped.row_group_chunk.tolist() == [0, 2]
    # 16x64 tiles: one row group of 4 (columns 0, 1, 2), dW programs of 2 entries: 0-1 and 2.
    narrow = build_block_layout(mask, (16, 64))
    assert narrow.row_group_ptr.tolist() == [0, 3] and narrow.row_group_chunk.tolist() == [0, 2]
    # A group of block-rows that keeps nothing still gets one (all-pruned) entry, for its bias gradient.
    empty = build_block_layout(torch.tensor([[0, 0], [1, 0]], dtype=torch.bool), (128, 128))
    assert empty.row_group_ptr.tolist() == [0, 1, 2] and empty.row_group_tile.tolist() == [[-1], [0]]


def test_from_dense_sparsity_element_mask_and_to_dense():
    torch.manual_seed(5)
    linear = nn.Linear(64, 48)
    layer = BlockSparseLinear.from_dense(linear, sparsity=0.5, block_size=16)
    assert layer.block_mask.shape == (3, 4) and layer.nnz_blocks == 6  # ceil(0.5 * 12) pruned, no ties
    # The kept tiles are the 6 with the largest L1 norms.
    norms = linear.weight.detach().abs().reshape(3, 16, 4, 16).sum(dim=(1, 3))
    assert torch.equal(layer.block_mask, norms > norms.flatten().sort().values[5])
    keep = element_mask(layer.block_mask, (16, 16), 48, 64)
    assert torch.equal(layer.to_dense(), linear.weight.detach() * keep)
    # An element mask keeps every tile touched by a kept entry and zeroes the other entries.
    elem = torch.zeros(48, 64, dtype=torch.bool)
    elem[3, 5] = elem[40, 63] = True
    from_elem = BlockSparseLinear.from_dense(linear, block_size=(16, 16), mask=elem)
    assert from_elem.nnz_blocks == 2
    assert torch.equal(from_elem.to_dense(), linear.weight.detach() * elem)
    assert torch.equal(from_elem.to_linear().weight, from_elem.to_dense())


def test_state_dict_round_trip_adopts_block_structure(tmp_path):
    torch.manual_seed(6)
    src = BlockSparseLinear.from_dense(nn.Linear(40, 70), sparsity=0.6, block_size=(16, 32), backend="torch")
    path = tmp_path / "bsl.pt"
    torch.save(src.state_dict(), path)
    # A fresh, fully dense module with another block size receives the checkpoint's structure.
    dst = BlockSparseLinear(40, 70, block_size=64, backend="torch")
    dst.load_state_dict(torch.load(path))
    assert dst.block_size == (16, 32) and torch.equal(dst.block_mask, src.block_mask)
    assert torch.equal(dst.to_dense(), src.to_dense())
    x = torch.randn(4, 40)
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
    # Inconsistent checkpoints are refused with the reason.
    bad = dict(src.state_dict())
    bad["values"] = bad["values"][:-1]
    with pytest.raises(RuntimeError, match="holds"):
        BlockSparseLinear(40, 70).load_state_dict(bad)


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_compiles_without_graph_breaks(compile_backend):
    torch._dynamo.reset()
    layer = BlockSparseLinear(40, 24, block_size=16, block_mask=torch.tensor([[1, 0, 1], [0, 1, 1]], dtype=torch.bool))
    compiled = torch.compile(layer, fullgraph=True, backend=compile_backend)
    x = torch.randn(2, 3, 40, requires_grad=True)
    y = compiled(x)
    y.sum().backward()
    expected = x.detach() @ layer.to_dense().detach().t() + layer.bias.detach()
    torch.testing.assert_close(y.detach(), expected, rtol=1e-5, atol=1e-5)
    assert layer.values.grad is not None and x.grad is not None


def test_autocast_uses_autocast_dtype(monkeypatch):
    import effst.nn.block_sparse as nn_block_sparse

    layer = BlockSparseLinear(32, 16, block_size=16, backend="torch")
    x = torch.randn(4, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), x @ layer.to_dense().detach().t() + layer.bias.detach(), rtol=3e-2, atol=3e-2)
    # Spikes stay bytes under autocast (the op reads uint8), with the float spikes' result.
    seen = []
    real = nn_block_sparse.block_sparse_linear_unchecked
    monkeypatch.setattr(nn_block_sparse, "block_sparse_linear_unchecked",
                        lambda x, *a: (seen.append((x.dtype, a[0].dtype)), real(x, *a))[1])
    spikes = torch.rand(4, 32) < 0.3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        from_bytes = layer(spikes.to(torch.uint8))
        from_floats = layer(spikes.to(torch.float32))
    assert seen == [(torch.uint8, torch.bfloat16), (torch.bfloat16, torch.bfloat16)]
    assert from_bytes.dtype == torch.bfloat16 and torch.equal(from_bytes, from_floats)


def test_bad_input_errors():
    linear = nn.Linear(40, 30)
    for bad in (24, 8, (16, 48), (32, 0), 16.0):
        with pytest.raises((ValueError, TypeError), match="block_size"):
            BlockSparseLinear.from_dense(linear, block_size=bad)
    for bad in (1.0, -0.1, float("nan"), 1.5):
        with pytest.raises(ValueError, match="sparsity"):
            BlockSparseLinear.from_dense(linear, sparsity=bad, block_size=16)
    with pytest.raises(ValueError, match=r"mask: expected a block mask of shape \(2, 3\)"):
        BlockSparseLinear.from_dense(linear, block_size=16, mask=torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"^block_mask: expected a block mask of shape \(2, 3\)"):
        BlockSparseLinear(40, 30, block_size=16, block_mask=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"^block_mask: expected a bool"):
        BlockSparseLinear(40, 30, block_size=16, block_mask=torch.full((2, 3), 0.5))
    with pytest.raises(TypeError, match=r"^block_mask: expected a bool tensor"):
        BlockSparseLinear(40, 30, block_size=16, block_mask=[[True] * 3] * 2)
    with pytest.raises(ValueError, match="mask: expected a bool"):  # an element mask is not silently thresholded
        BlockSparseLinear.from_dense(linear, block_size=16, mask=torch.full((30, 40), 0.5))
    with pytest.raises(ValueError, match="not both"):
        BlockSparseLinear.from_dense(linear, sparsity=0.5, mask=torch.ones(30, 40, dtype=torch.bool))
    with pytest.raises(TypeError, match="linear"):
        BlockSparseLinear.from_dense(nn.Conv1d(40, 30, 1))
    layer = BlockSparseLinear(40, 30, block_size=16, backend="torch")
    with pytest.raises(ValueError, match=r"x: expected shape \[\.\.\., 40\]"):
        layer(torch.randn(2, 41))
    with pytest.raises(TypeError, match="x: expected dtype torch.float32"):
        layer(torch.randn(2, 40, dtype=torch.float64))
    with pytest.raises(TypeError, match="x: expected dtype"):
        layer(torch.ones(2, 40, dtype=torch.int32))
    with pytest.raises(ValueError, match="backend"):
        BlockSparseLinear(40, 30, backend="cuda")
    assert check_block_size(64) == (64, 64)
    with pytest.raises(ValueError, match="backend"):
        block_sparse_linear(torch.randn(2, 40), layer.values, layer.layout, 30, backend="fast")


GPU_CASES = [  # (dtype, block, input): every block size once in bf16, spikes once, the other dtypes
    (torch.bfloat16, (16, 16), "dense"),
    (torch.bfloat16, (32, 32), "spike"),
    (torch.bfloat16, (64, 64), "dense"),
    (torch.bfloat16, (128, 128), "dense"),  # DEFAULT_BLOCK_SIZE
    (torch.bfloat16, (64, 128), "spike"),
    (torch.float16, (32, 32), "dense"),
    (torch.float32, (32, 64), "dense"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,block,kind", GPU_CASES, ids=[f"{c[0]}-{c[1][0]}x{c[1][1]}-{c[2]}" for c in GPU_CASES])
def test_gpu_spikformer_shape_matches_reference(dtype, block, kind, device):
    g = torch.Generator().manual_seed(7)
    in_features, out_features = 384, 1536
    block_mask = random_block_mask(out_features, in_features, block, 0.25, g, empty_rows=(3,))
    layer, weight, bias, _ = make_layer(in_features, out_features, block, block_mask, dtype, device)
    if kind == "spike":
        x_ref = (torch.rand(4, 8, 64, in_features, generator=g) < 0.2).to(torch.float64)
        x = x_ref.to(device=device, dtype=torch.uint8)
    else:
        x_ref = torch.randn(4, 8, 64, in_features, generator=g, dtype=torch.float64)
        x = x_ref.to(device=device, dtype=dtype).requires_grad_()
    y = layer(x)
    grad_y = torch.randn(y.shape, generator=g, dtype=torch.float64).to(dtype)
    y.backward(grad_y.to(device=device))
    y_ref, gx_ref, gw_ref, gb_ref = reference(x_ref.to(dtype) if kind == "dense" else x_ref, weight, bias, grad_y)
    checks = [(y, y_ref, "y"), (layer.values.grad, tiles_of(gw_ref, block_mask, block), "grad values"),
              (layer.bias.grad, gb_ref, "grad bias")]
    if kind == "dense":
        checks.append((x.grad, gx_ref, "grad x"))
    for got, want, what in checks:
        assert_close(got, want, dtype, what)


def test_sparse_bench_rows_on_cpu(monkeypatch):
    """effst.benchmarks.sparse yields honest rows on the CPU: every column of a measured layer row
    (no timing is asserted here), rows appended to the caller's list as they finish."""
    from effst.benchmarks import sparse

    monkeypatch.setattr(sparse, "_plan", lambda device, quick: (32, [((64, 96), 16, 0.5, "dense"), ((64, 96), 16, 0.75, "spike")]))
    rows: list = []
    returned = sparse.run("cpu", True, rows=rows, log=lambda line: None)
    assert returned is rows and [(r["kind"], r["status"]) for r in rows] == [
        ("spike-bytes", "ok"), ("layer", "ok"), ("layer", "ok")], rows
    spikes = rows.pop(0)
    # Spikformer-4-384 at 224 px, per image and timestep (independent count from the architecture):
    # patch splitting 48*224^2 + 96*112^2 + 192*56^2 + 384*28^2 + 384*14^2 (RPE) = 4,591,104;
    # per block q, k, v, attention, projection 5*196*384 + fc1 196*1536 + fc2 196*384 = 752,640.
    per_image_step, readers = 4_591_104 + 4 * 752_640, 4 * (3 * 196 * 384 + 196 * 1536)
    batch_steps = 16 * 4  # quick: batch 16, T = 4
    assert spikes["spikes_per_step"] == per_image_step * batch_steps and spikes["neurons"] == 33
    assert spikes["byte_reader_spikes_per_step"] == readers * batch_steps
    assert spikes["spike_bytes_bf16"] == 2 * 2 * per_image_step * batch_steps  # written + read, 2 B
    assert spikes["byte_reader_spike_bytes_uint8"] == 2 * readers * batch_steps
    assert spikes["byte_reader_saving_bytes_vs_bf16"] == 2 * readers * batch_steps
    first = rows[0]
    for key in ("effst_fwd_ms", "effst_fwd_bwd_ms", "dense_fwd_ms", "dense_fwd_bwd_ms", "speedup_fwd_bwd",
                "tflops_ratio_fwd_bwd", "floor_bytes_fwd_bwd", "block_sparsity", "date", "machine", "command"):
        assert key in first and first[key] is not None, key
    assert first["kept_tiles"] == 24 - 12 and rows[1]["input"] == "spike uint8"
    assert "break_even_sparsity_fwd_bwd" in first
    # The memory floor of every layer row (fp32: 4 B; uint8 spikes 1 B, no dX), on the CPU too.
    m, k, n = 32, 64, 96
    for row, x_bytes in ((first, 4), (rows[1], 1)):
        weight = row["kept_tiles"] * 16 * 16 * 4
        fwd = m * k * x_bytes + weight + m * n * 4 + n * 4
        bwd = m * n * 4 + weight + n * 4 + (m * k * 4 if x_bytes == 4 else 0)
        assert (row["floor_bytes_fwd"], row["floor_bytes_fwd_bwd"]) == (fwd, fwd + bwd)
        for name in ("fwd", "fwd_bwd"):
            assert row[f"floor_ms_{name}"] > 0
            assert row[f"floor_fraction_{name}"] == pytest.approx(row[f"floor_ms_{name}"] / row[f"effst_{name}_ms"])
    # 2:4 weights: the kept half plus a 2-bit index per kept value.
    assert sparse.two_four_weight_bytes(1536, 384, 2) == 1536 * 384 // 2 * 2 + 1536 * 384 // 2 // 4
    with pytest.raises(ValueError, match="device"):
        sparse.run("tpu", True)


def test_custom_ops_pass_opcheck():
    """The compile-time custom ops (schema, fake kernels, autograd registration) are consistent."""
    from effst.ops import block_sparse_linear as bsl

    g = torch.Generator().manual_seed(12)
    block_mask = random_block_mask(40, 48, (16, 16), 0.6, g, empty_rows=(1,))
    layout = list(build_block_layout(block_mask, (16, 16)))
    values = torch.randn(int(block_mask.sum()), 16, 16, generator=g, requires_grad=True)
    bias = torch.randn(40, generator=g, requires_grad=True)
    x = torch.randn(9, 48, generator=g, requires_grad=True)
    triton_path = bsl.use_triton(x.device, "auto")
    torch.library.opcheck(torch.ops.effst.block_sparse_linear.default, (x, values, bias, layout, 40, triton_path))
    grad_y = torch.randn(9, 40, generator=g)
    torch.library.opcheck(torch.ops.effst.block_sparse_linear_backward.default,
                          (grad_y, x.detach(), values.detach(), layout, True, True, True, triton_path))


def test_no_launch_for_gradients_nobody_needs(monkeypatch):
    """Spike inputs launch no grad-input kernel; a frozen weight launches no grad-weight kernel."""
    from effst.ops import block_sparse_linear as bsl

    calls = []
    for name in ("_grad_input", "_grad_weight"):
        real = getattr(bsl, name)
        monkeypatch.setattr(bsl, name, lambda *a, _real=real, _name=name, **k: (calls.append(_name), _real(*a, **k))[1])
    layer = BlockSparseLinear(48, 40, block_size=16)
    layer(torch.rand(5, 48) < 0.5).sum().backward()
    assert calls == ["_grad_weight"] and layer.bias.grad is not None
    calls.clear()
    layer.values.requires_grad_(False)
    x = torch.randn(5, 48, requires_grad=True)
    layer(x).sum().backward()
    assert calls == ["_grad_input"] and x.grad is not None


@pytest.mark.gpu
@pytest.mark.compile
def test_gpu_no_host_sync_cuda_graph_and_compile(device):
    """After the first call (which tunes its launch configuration), a fwd+bwd makes no host
    synchronisation, replays from a CUDA graph, and compiles with Inductor (fullgraph, also
    reduce-overhead) to the same numbers."""
    torch.manual_seed(13)
    g = torch.Generator().manual_seed(13)
    block_mask = random_block_mask(1536, 384, (64, 64), 0.25, g)
    layer, _, _, _ = make_layer(384, 1536, (64, 64), block_mask, torch.bfloat16, device)
    x = torch.randn(4, 512, 384, device=device, dtype=torch.bfloat16, requires_grad=True)
    grad_y = torch.randn(4, 512, 1536, device=device, dtype=torch.bfloat16)

    def step():
        return torch.autograd.grad(layer(x), [x, layer.values, layer.bias], grad_y)

    expected = step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(captured, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for mode in (None, "reduce-overhead"):
        torch._dynamo.reset()
        compiled = torch.compile(layer, fullgraph=True, mode=mode)
        for _ in range(3):
            y = compiled(x)
        torch.testing.assert_close(y, layer(x), rtol=1e-2, atol=1e-2)


def test_one_autograd_node_per_call():
    """An eager call of any leading shape is one autograd node, straight onto the leaves (no
    view/reshape nodes generated around it)."""
    layer = BlockSparseLinear(48, 40, block_size=16)
    x = torch.randn(2, 3, 48, requires_grad=True)
    y = layer(x)
    assert type(y.grad_fn).__name__ == "BlockSparseLinearFunctionBackward"
    assert sorted(type(fn).__name__ for fn, _ in y.grad_fn.next_functions if fn is not None) == ["AccumulateGrad"] * 3
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_launch_parameters_worked_out_once_per_call_shape(monkeypatch):
    """The second call of a shape reuses the cached launch parameters (no config lookup); a new
    number of rows gets its own."""
    from effst.ops import block_sparse_linear as bsl

    calls = []
    real = bsl._config
    monkeypatch.setattr(bsl, "_config", lambda kind, *a, **k: (calls.append(kind), real(kind, *a, **k))[1])
    bsl._LAUNCHES.clear()
    layer = BlockSparseLinear(48, 40, block_size=16, backend="triton")
    x = torch.randn(5, 48, requires_grad=True)
    for _ in range(2):
        layer(x).sum().backward()
    assert sorted(calls) == ["forward", "grad_input", "grad_weight"]
    layer(torch.randn(7, 48)).sum().backward()
    assert len(calls) == 5  # forward and grad-weight for M = 7; no input gradient asked


def test_spikformer_inference_with_uint8_spikes_end_to_end():
    """sLIF neurons emit uint8 spikes (inference) straight into BlockSparseLinear layers, pruned
    (block L1P) and dense (every tile kept), and into the residual adds: the logits equal those
    of the float-spike model bit for bit (0/1 is exact in every dtype)."""
    from effst import prune
    from effst.benchmarks.sparse import SPIKE_BYTE_READERS
    from effst.models import build_model
    from effst.models.spikformer import prune_targets

    torch.manual_seed(15)
    net = build_model("spikformer-tiny", neuron="slif", backend="reference").eval()
    targets = prune_targets(net)
    prune.block_l1p(net, 0.5, targets=[t for t in targets if t.endswith("fc2")], block_size=(16, 16))
    prune.to_block_sparse(net, targets=targets)  # fc2 pruned, the rest dense BlockSparseLinear
    assert all(type(net.get_submodule(t)).__name__ == "BlockSparseLinear" for t in targets)
    x = torch.rand(2, 1, 8, 8) * 3
    with torch.no_grad():
        expected = net(x)
        readers = [m for name, m in net.neurons() if name.endswith(SPIKE_BYTE_READERS)]
        assert len(readers) == 4
        for module in readers:
            module.spike_dtype = torch.uint8
        seen = []
        hooks = [net.get_submodule(t).register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
                 for t in targets if t.endswith(("proj_linear", "fc2"))]
        got = net(x)
        for hook in hooks:
            hook.remove()
    assert seen == [torch.uint8, torch.uint8]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_host_cost_mode_counts_launches_and_restores_the_kernels():
    """``python -m effst.benchmarks.sparse --host-cost``: three launches (forward, grad input,
    grad weight) per fwd+bwd on the Triton path, all three through the launch cache's
    ``CompiledKernel.run`` in the cached row, and the real kernels and cache hooks are back
    afterwards."""
    from effst.benchmarks import sparse
    from effst.ops import block_sparse_linear as bsl
    from effst.ops import launch as launch_ops

    kernel, use_triton, plans = bsl._bsl_forward_kernel, bsl._use_triton, bsl._LAUNCHES
    cacheable, device_and_stream = launch_ops._cacheable, launch_ops._device_and_stream
    cost = sparse.host_cost(rows=4, rounds=1, round_seconds=0.01)
    assert cost["launches_per_call"] == 3
    assert cost["cached_runs_per_call"] == 3 and cost["jit_launches_per_cached_call"] == 0
    assert all(cost[f"{row}_us{stat}"] > 0 for row in ("torch", "triton_python", "triton_jit", "triton_cached", "dense")
               for stat in ("", "_min"))
    assert bsl._bsl_forward_kernel is kernel and bsl._use_triton is use_triton and bsl._LAUNCHES is plans
    assert launch_ops._cacheable is cacheable and launch_ops._device_and_stream is device_and_stream


@pytest.mark.gpu
def test_gpu_two_four_row_has_its_memory_floor(device):
    """The sparse suite's 2:4 row on CUDA (small M): timed beside dense, with its memory floor."""
    from effst.benchmarks import sparse

    row = sparse._two_four_row(1024, 384, 1536, "cuda", torch.bfloat16, True, {}, bandwidth=1e12)
    floor = 1024 * 384 * 2 + sparse.two_four_weight_bytes(1536, 384, 2) + 1024 * 1536 * 2 + 1536 * 2
    assert row["floor_bytes_fwd"] == floor and row["floor_ms_fwd"] == pytest.approx(floor / 1e12 * 1e3)
    assert row["semi_structured_fwd_ms"] > 0 and row["dense_fwd_ms"] > 0 and row["floor_fraction_fwd"] > 0


@pytest.mark.gpu
def test_gpu_spike_bytes_row_times_bf16_and_uint8_spikes(device):
    """The sparse suite's spike-bytes row on CUDA: the block-sparse Spikformer-4-384 (CIFAR shape
    here, to stay quick) timed with its byte-reading neurons emitting bf16 and uint8 spikes."""
    from effst.benchmarks import sparse

    row = sparse._spike_bytes_row("cuda", True, {}, overrides={"image_size": 32, "variant": "cifar",
                                                                 "num_classes": 10, "in_channels": 3})
    assert row["status"] == "ok" and row["byte_reader_spikes_per_step"] > 0
    for key in ("inference_ms_bf16_spikes", "inference_ms_uint8_spikes", "inference_speedup_uint8_spikes"):
        assert row[key] > 0, key


def test_autotune_times_candidates_once_per_key_and_keeps_the_fastest(monkeypatch):
    """On CUDA the first call of a tune key times every candidate and caches the fastest;
    later calls of the key time nothing; a candidate that fails is skipped; while compiling or
    capturing (tuning disabled) the default is used and not cached. Simulated on the CPU:
    the device is only inspected, and the timing is mocked."""
    from effst.ops import block_sparse_linear as bsl

    monkeypatch.setattr(bsl, "_TUNED", {})
    monkeypatch.delenv("EFFST_BSL_AUTOTUNE", raising=False)
    enabled = [True]
    monkeypatch.setattr(bsl, "_autotune_enabled", lambda device: enabled[0])
    candidates = bsl._candidates("forward", 128, 64, torch.bfloat16)
    assert len(candidates) == 3
    ms = {candidates[0]: 3.0, candidates[1]: 1.0, candidates[2]: 2.0}
    launched = []

    def fake_do_bench(fn, warmup, rep):
        fn()
        return ms[launched[-1]]

    monkeypatch.setattr(bsl.triton.testing, "do_bench", fake_do_bench)
    cuda = torch.device("cuda", 0)

    def config(key, launch=launched.append):
        return bsl._config("forward", key, cuda, 128, 64, torch.bfloat16, 4096, launch)

    assert config(("a",)) == (candidates[1], True) and launched == candidates
    launched.clear()
    assert config(("a",)) == (candidates[1], True) and launched == []  # cached
    ms[candidates[2]] = 0.5
    assert config(("b",)) == (candidates[2], True) and launched == candidates  # a new key tunes again

    def failing(cfg):
        launched.append(cfg)
        if cfg == candidates[2]:
            raise RuntimeError("out of shared memory")

    assert config(("c",), failing) == (candidates[1], True)
    enabled[0] = False  # compiling / capturing a CUDA graph: the default, not cached
    launched.clear()
    assert config(("d",)) == (candidates[0], False) and launched == [] and ("forward", 0, "d") not in bsl._TUNED
    monkeypatch.setenv("EFFST_BSL_AUTOTUNE", "0")
    assert config(("e",)) == (candidates[0], True) and bsl._TUNED[("forward", 0, "e")] == candidates[0]


def test_tune_keys_hold_shape_dtype_tile_layout_work_and_tf32(monkeypatch):
    """The keys the launchers tune under: one per (kind, M rounded to a power of two, shape,
    tile, dtype, TF32, layout work). Two layers of one shape and kept-tile count whose tiles
    cluster differently (one block-column vs a diagonal: 1 vs 4 forward lookup entries) get
    different forward keys; another M of the same power of two shares the key."""
    from effst.ops import block_sparse_linear as bsl

    keys = []
    real = bsl._config
    monkeypatch.setattr(bsl, "_config", lambda kind, key, *a, **k: (keys.append((kind, key)), real(kind, key, *a, **k))[1])
    monkeypatch.setattr(bsl, "_LAUNCHES", {})

    def tune_keys(block_mask, m=20, dtype=torch.float32, block=(16, 16)):
        keys.clear()
        layer = BlockSparseLinear(64, 64, block_size=block, block_mask=block_mask, backend="triton", dtype=dtype)
        x = torch.randn(m, 64, dtype=dtype, requires_grad=True)
        layer(x).sum().backward()
        return dict(keys)

    column = torch.zeros(4, 4, dtype=torch.bool)
    column[:, 0] = True
    diagonal = torch.eye(4, dtype=torch.bool)
    base = tune_keys(column)
    assert sorted(base) == ["forward", "grad_input", "grad_weight"]
    other = tune_keys(diagonal)
    assert other["forward"] != base["forward"]  # same shape, dtype, tile and nnz; other layout work
    assert tune_keys(column, m=30) == base  # new launch plans (exact M), the same tuning

    def all_differ(found):
        return sorted(found) == sorted(base) and all(found[kind] != base[kind] for kind in base)

    assert all_differ(tune_keys(column, m=40))  # M 40 rounds to 64, not 32
    assert all_differ(tune_keys(column, dtype=torch.float16))
    narrow = torch.zeros(4, 2, dtype=torch.bool)
    narrow[:, 0] = True  # 4 kept 16x32 tiles of the same 64x64 weight
    assert all_differ(tune_keys(narrow, block=(16, 32)))
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = not tf32  # (monkeypatch cannot restore this attribute)
    try:
        assert all_differ(tune_keys(column))  # fp32 products in TF32 or not
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def test_functional_bad_inputs_name_the_argument():
    """block_sparse_linear validates every argument: values' shape, dtype and tile, the layout
    against the values (tile count, tile grouping) and x / out_features against the layout,
    bias, x's dtype; BlockSparseLinear refuses a non-float dtype."""
    g = torch.Generator().manual_seed(21)
    block_mask = random_block_mask(30, 40, (16, 16), 0.7, g)
    block_mask[0, 0] = True
    layout = build_block_layout(block_mask, (16, 16))
    nnz = int(block_mask.sum())
    values = torch.randn(nnz, 16, 16, generator=g)
    x = torch.randn(3, 40, generator=g)
    ok = block_sparse_linear(x, values, layout, 30, torch.zeros(30), backend="torch")
    assert ok.shape == (3, 30)
    bad_calls = [
        (dict(values=values[0]), ValueError, r"values: expected \[nnz_blocks"),
        (dict(values=values.to(torch.int32)), TypeError, "values: expected a float32"),
        (dict(values=torch.randn(nnz, 16, 24)), ValueError, "values block shape"),
        (dict(values=values[:-1]), ValueError, f"layout: describes {nnz} blocks but values holds {nnz - 1}"),
        (dict(layout=build_block_layout(block_mask, (64, 64))), ValueError, r"layout: grouped for another tile .*\(16, 16\)"),
        (dict(layout=tuple(layout)), TypeError, "layout: expected a BlockLayout"),
        (dict(x=torch.randn(3, 56)), ValueError, "x: last dim 56 does not fit a layout of 3 block-columns"),
        (dict(x=torch.tensor(1.0)), ValueError, "x: expected a tensor of shape"),
        (dict(x=x.double()), TypeError, "x: expected dtype torch.float32"),
        (dict(x=x.to(torch.int8)), TypeError, "x: expected dtype torch.float32 .* or bool/uint8 spikes"),
        (dict(x=x.tolist()), TypeError, "x: expected a torch.Tensor"),
        (dict(out_features=40), ValueError, "out_features: 40 does not fit a layout of 2 block-rows"),
        (dict(bias=torch.zeros(31)), ValueError, r"bias: expected shape \(30,\)"),
        (dict(bias=torch.zeros(30, dtype=torch.float64)), TypeError, "bias: expected dtype torch.float32"),
        (dict(backend="cuda"), ValueError, "backend: expected one of"),
    ]
    for change, error, match in bad_calls:
        args = dict(x=x, values=values, layout=layout, out_features=30, bias=torch.zeros(30), backend="torch")
        args.update(change)
        with pytest.raises(error, match=match):
            block_sparse_linear(args.pop("x"), args.pop("values"), args.pop("layout"), args.pop("out_features"),
                                args.pop("bias"), **args)
    for dtype in (torch.int32, torch.bool, torch.complex64):
        with pytest.raises(TypeError, match="dtype: expected None or one of"):
            BlockSparseLinear(40, 30, block_size=16, dtype=dtype)


def test_sparse_suite_gpu_schedule():
    """The CUDA plan (built without a GPU): the issue's rows first -- 64x64 tiles, both shapes,
    90/75/50 % with bf16 inputs and 90 % with uint8 spikes --, then 2:4, Spikformer and
    spike-byte rows, then the default tile (128x128, the model rows' layout; --quick: at 90 %
    only) before any other, so a suite cut by its budget loses the other tiles first."""
    from effst import prune
    from effst.benchmarks import sparse

    for quick in (True, False):
        m, configs = sparse._plan("cuda", quick)
        assert m == 32768
        schedule = sparse._schedule("cuda", configs, quick)
        kinds = [kind for kind, _ in schedule]
        first_other = kinds.index("2:4")
        head = [what for _, what in schedule[:first_other]]
        assert all(block == 64 for _, block, _, _ in head)
        for shape in sparse.SHAPES:
            for p in (0.9, 0.75, 0.5):
                assert (shape, 64, p, "dense") in head
            assert (shape, 64, 0.9, "spike") in head
        assert kinds[first_other:first_other + 2] == ["2:4", "2:4"] and "spike-bytes" in kinds
        tail = [what for kind, what in schedule[kinds.index("spike-bytes") + 1:]]
        assert all(kind == "layer" for kind in kinds[kinds.index("spike-bytes") + 1:])
        default = prune.DEFAULT_BLOCK_SIZE[0]
        assert prune.DEFAULT_BLOCK_SIZE == (default, default)
        for shape in sparse.SHAPES:
            assert (shape, default, 0.9, "dense") in tail and (shape, default, 0.9, "spike") in tail
        blocks = [block for _, block, _, _ in tail]
        assert blocks[0] == default and blocks == sorted(blocks, key=lambda b: b != default)  # default tile first
    assert [kind for kind, _ in sparse._schedule("cpu", sparse._plan("cpu", True)[1], True)][0] == "spike-bytes"


def test_sparse_suite_break_even_sparsity():
    """break_even_sparsity_fwd_bwd: where the fwd+bwd speedup crosses 1, linearly interpolated
    between the measured sparsities, per (shape, tile, input); None when it never crosses, or is
    already >= 1 at the lowest sparsity measured."""
    from effst.benchmarks import sparse

    def rows(points, block=64, inp="dense"):
        return [{"kind": "layer", "status": "ok", "in_features": 384, "out_features": 1536, "block": block,
                 "input": inp, "sparsity": p, "speedup_fwd_bwd": v} for p, v in points]

    crossing = rows([(0.9, 1.5), (0.5, 0.8), (0.75, 1.1)])
    never = rows([(0.5, 0.4), (0.9, 0.9)], block=32)
    always = rows([(0.5, 1.2), (0.9, 2.0)], inp="spike uint8")
    failed = [{"kind": "layer", "status": "error"}]
    sparse._break_even(crossing + never + always + failed)
    assert all(r["break_even_sparsity_fwd_bwd"] == pytest.approx(0.5 + 0.25 * 0.2 / 0.3) for r in crossing)
    assert all(r["break_even_sparsity_fwd_bwd"] is None for r in never + always)
    assert "break_even_sparsity_fwd_bwd" not in failed[0]
