"""Spikes held as one byte each while autograd sees a float tensor (issue 10, training path).

An integer tensor cannot carry a gradient in PyTorch, so sLIF spikes emitted as torch.uint8 /
torch.bool used to be inference-only. :class:`SpikeBytes` is a wrapper tensor whose dtype is
the float dtype autograd sees (the sLIF input's) and which holds the 0/1 spikes as bytes
(``.spike_bytes``, uint8 or bool, same shape and strides). Autograd treats it as an ordinary
float output: the sLIF node's gradient path is unchanged, and ``grad_spikes`` reaches its
backward as a float tensor.

What it saves: consumers that read bytes (``BlockSparseLinear``, see docs/block_sparse.md)
take ``.spike_bytes`` and save the bytes for their weight gradient (1 byte per spike instead of
2-4). View-like ops (view/reshape, permute, transpose, flatten, slice, select, (un)squeeze,
expand, split, unbind, detach, alias, clone) return SpikeBytes over the viewed bytes, so they
keep that saving; every other op reads the float value (``bytes.to(dtype)``, exact for 0/1)
and runs as usual, returning plain tensors: correct, just without the saving. A PyTorch op
that saves its SpikeBytes input for backward (``x * w``, ``nn.Linear``) keeps only the bytes.

Refused with an error: writing into a SpikeBytes (in-place ops, ``out=``), bytes that are not
uint8/bool, a non-float dtype, and running under ``torch.compile`` (Dynamo cannot trace this
subclass; use float spikes, ``spike_dtype=None``, in compiled code).
"""
from __future__ import annotations

import torch
from torch.utils._pytree import tree_map

from effst.ops.layout import BYTE_DTYPES, FLOAT_DTYPES

aten = torch.ops.aten


# Ops that only re-view (or copy) their input's elements: applied to the bytes, they give the
# bytes of the result, which stays a SpikeBytes. Not aten.view.dtype (a reinterpretation).
_BYTE_PRESERVING = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.permute.default,
    aten.transpose.int, aten.t.default, aten.flatten.using_ints, aten.slice.Tensor,
    aten.select.int, aten.unsqueeze.default, aten.squeeze.default, aten.squeeze.dim,
    aten.squeeze.dims, aten.expand.default, aten.detach.default, aten.alias.default,
    aten.clone.default, aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int,
    aten.chunk.default, aten.narrow.default, aten.unfold.default, aten.movedim.int,
    aten.contiguous.default, aten.as_strided.default,
}


def compile_error(spike_dtype: object = "torch.uint8/torch.bool") -> RuntimeError:
    """The error for spikes as bytes with a gradient met while torch.compile traces."""
    return RuntimeError(
        f"spike_dtype={spike_dtype} with a gradient (spikes held as bytes for training, SpikeBytes) "
        "cannot be traced by torch.compile; use spike_dtype=None (float spikes) in compiled code, "
        "or run this part eagerly")


class SpikeBytes(torch.Tensor):
    """A float tensor (for autograd) whose 0/1 values are stored as bytes (``.spike_bytes``).

    ``SpikeBytes(spike_bytes, dtype)``: ``spike_bytes`` uint8 (0/1) or bool, ``dtype`` the
    float dtype the tensor presents. Normally made by the sLIF op (``spike_dtype=`` with a
    gradient needed) or :func:`as_spike_bytes`.
    """

    spike_bytes: torch.Tensor

    @staticmethod
    def __new__(cls, spike_bytes: torch.Tensor, dtype: torch.dtype, requires_grad: bool = False):
        if not isinstance(spike_bytes, torch.Tensor) or isinstance(spike_bytes, SpikeBytes):
            raise TypeError(f"spike_bytes: expected a uint8/bool torch.Tensor, got "
                            f"{type(spike_bytes).__name__}")
        if spike_bytes.dtype not in BYTE_DTYPES:
            raise TypeError(f"spike_bytes: expected dtype torch.uint8 or torch.bool, got "
                            f"{spike_bytes.dtype}")
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype: expected float16/bfloat16/float32/float64 (the dtype autograd "
                            f"sees), got {dtype}")
        if torch.compiler.is_compiling():
            raise compile_error()
        out = torch.Tensor._make_wrapper_subclass(
            cls, spike_bytes.shape, strides=spike_bytes.stride(),
            storage_offset=spike_bytes.storage_offset(), dtype=dtype, device=spike_bytes.device,
            requires_grad=requires_grad)
        out.spike_bytes = spike_bytes
        return out

    # Plain-tensor results must not be re-wrapped as SpikeBytes (Tensor.__torch_function__ would).
    __torch_function__ = torch._C._disabled_torch_function_impl

    def materialize(self) -> torch.Tensor:
        """The float values as a plain tensor (a new tensor; no autograd history)."""
        return self.spike_bytes.to(self.dtype)

    def __repr__(self, *, tensor_contents=None) -> str:
        grad = ""
        if self.grad_fn is not None:
            grad = f", grad_fn=<{type(self.grad_fn).__name__}>"
        elif self.requires_grad:
            grad = ", requires_grad=True"
        return (f"SpikeBytes({self.materialize()!r}, dtype={self.dtype}, "
                f"stored as {self.spike_bytes.dtype}{grad})")

    def __reduce_ex__(self, protocol):
        return (_rebuild, (self.spike_bytes, self.dtype, self.requires_grad))

    def __deepcopy__(self, memo):
        if not self.is_leaf:
            raise RuntimeError("SpikeBytes: only graph leaves support the deepcopy protocol "
                               "(as for any tensor); detach() first")
        if id(self) in memo:
            return memo[id(self)]
        copied = SpikeBytes(self.spike_bytes.clone(), self.dtype, self.requires_grad)
        memo[id(self)] = copied
        return copied

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.compiler.is_compiling():
            raise compile_error()
        for value, arg in zip((*args, *kwargs.values()), _written_args(func, args, kwargs)):
            if arg and isinstance(value, SpikeBytes):
                raise RuntimeError(
                    f"SpikeBytes: {func} would write into spikes held as bytes; they are "
                    "read-only (x.materialize() or x * 1 gives a float copy to modify)")
        if func in _BYTE_PRESERVING:
            dtype = _float_dtype(args)
            out = func(*tree_map(_bytes_of, args), **tree_map(_bytes_of, kwargs))
            return tree_map(lambda t: SpikeBytes(t, dtype)
                            if isinstance(t, torch.Tensor) and t.dtype in BYTE_DTYPES else t, out)
        return func(*tree_map(_float_of, args), **tree_map(_float_of, kwargs))


def _rebuild(spike_bytes: torch.Tensor, dtype: torch.dtype, requires_grad: bool) -> SpikeBytes:
    return SpikeBytes(spike_bytes, dtype, requires_grad)


def _bytes_of(t):
    return t.spike_bytes if isinstance(t, SpikeBytes) else t


def _float_of(t):
    return t.materialize() if isinstance(t, SpikeBytes) else t


def _float_dtype(args) -> torch.dtype:
    return next(a.dtype for a in args if isinstance(a, SpikeBytes))


def _written_args(func, args, kwargs) -> list:
    """Per argument value (positional then keyword, as passed): whether ``func`` writes it."""
    schema = func._schema
    if not schema.is_mutable:
        return [False] * (len(args) + len(kwargs))
    by_name = {a.name: a for a in schema.arguments}

    def writes(a) -> bool:
        return a is not None and a.alias_info is not None and a.alias_info.is_write

    flags = [writes(schema.arguments[i]) if i < len(schema.arguments) else False
             for i in range(len(args))]
    return flags + [writes(by_name.get(name)) for name in kwargs]


class _AsSpikeBytes(torch.autograd.Function):
    """Float 0/1 spikes -> SpikeBytes (identity for autograd: the gradient passes unchanged)."""

    @staticmethod
    def forward(ctx, spikes, byte_dtype):
        return SpikeBytes(spikes.to(byte_dtype), spikes.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def as_spike_bytes(spikes: torch.Tensor, byte_dtype: torch.dtype = torch.uint8, *,
                   check_values: bool = True) -> torch.Tensor:
    """Float 0/1 ``spikes`` as :class:`SpikeBytes` (``byte_dtype`` uint8 or bool), keeping
    their gradient path (for backends that produce float spikes: reference, native). Values
    other than 0 and 1 are refused (they would not survive the byte); ``check_values=False``
    skips that check (a device sync) for spikes a neuron made."""
    if not isinstance(spikes, torch.Tensor) or not spikes.is_floating_point():
        raise TypeError(f"spikes: expected a floating-point tensor, got "
                        f"{getattr(spikes, 'dtype', type(spikes).__name__)}")
    if byte_dtype not in BYTE_DTYPES:
        raise TypeError(f"byte_dtype: expected torch.uint8 or torch.bool, got {byte_dtype}")
    if isinstance(spikes, SpikeBytes):
        return spikes
    if check_values and spikes.numel() and not bool(((spikes == 0) | (spikes == 1)).all()):
        raise ValueError("spikes: expected 0/1 values (spikes), got other values; they would "
                         "not survive conversion to bytes")
    return _AsSpikeBytes.apply(spikes, byte_dtype)


class _FloatValues(torch.autograd.Function):
    """SpikeBytes -> its float values as a plain tensor (identity for autograd)."""

    @staticmethod
    def forward(ctx, spikes):
        return spikes.materialize()

    @staticmethod
    def backward(ctx, grad):
        return grad


def float_values(x: torch.Tensor) -> torch.Tensor:
    """``x``, or for a :class:`SpikeBytes` its float values as a plain tensor that keeps the
    gradient path: for code that takes data pointers (Triton launches, C++ operators), which a
    wrapper tensor does not have (Triton read a null pointer, the native sLIF crashed)."""
    return _FloatValues.apply(x) if type(x) is SpikeBytes else x


__all__ = ["SpikeBytes", "as_spike_bytes", "float_values", "BYTE_DTYPES"]
