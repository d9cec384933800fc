"""Spiking neuron modules: sLIF (learned tau and threshold), PLIF (learned tau), LIF (fixed).

They drop in where SpikingJelly's ``LIFNode(step_mode='m')`` / ``ParametricLIFNode`` stand:
input ``[T, ...]``, spikes of the same shape out, a membrane state ``v`` that persists across
calls until ``reset()`` (which ``spikingjelly.activation_based.functional.reset_net`` calls).
Under ``torch.compile(mode="reduce-overhead")`` the stored ``module.v`` is a CUDA-graph output,
valid only until the next ``torch.compiler.cudagraph_mark_step_begin()``: reset the neurons at
the start of each step (inside the compiled function) rather than reading ``v`` across steps.
The same holds under ``torch.utils.checkpoint``: its recompute runs after the first forward has
moved ``v`` on, so a recompute that finds a stored state is refused with an error; reset the
neurons first thing inside the checkpointed function.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import nn

from effst.ops.layout import FLOAT_DTYPES, normalize_channel_dim, resolve_parameter_layout
from effst.ops.parametrization import check_tau, tau_to_w, w_to_tau
from effst.ops.slif import (BACKENDS, SLIFPlan, check_spike_dtype, make_plan, resolve_backend,
                            slif, slif_with_plan)
from effst.ops.surrogates import resolve_surrogate

# Attributes the cached launch plans depend on: setting one drops the cache (the parameters
# too: a plan holds their layout, and was made after checking their device; moving the module,
# nn.Module._apply, drops it as well).
_PLAN_OPTIONS = frozenset({"v_reset", "surrogate", "alpha", "detach_reset", "decay_input",
                           "channels", "channel_dim", "backend", "spike_dtype",
                           "w", "v_threshold"})


def _in_backward_pass() -> bool:
    """Running inside an autograd backward pass (e.g. a torch.utils.checkpoint recompute).
    Not asked while torch.compile traces (Dynamo cannot trace the question)."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


class SLIF(nn.Module):
    """Leaky integrate-and-fire neuron with learnable time constant and threshold (sLIF).

    Args:
        tau: initial membrane time constant (> 1); stored as the decay logit ``w``.
        v_threshold: initial firing threshold.
        v_reset: hard-reset potential, or None for soft reset.
        surrogate, alpha: surrogate gradient name and width (None = the surrogate's default).
        detach_reset, decay_input: as in SpikingJelly's LIFNode.
        learn_tau, learn_threshold: make ``w`` / ``v_threshold`` trainable Parameters
            (otherwise they are buffers, saved in the state_dict but not trained).
        channels: None for per-layer scalars, or C for one tau/threshold per channel.
        channel_dim: dim of the per-step input shape that indexes the channels.
        backend: 'auto', 'reference', 'triton' or 'native' (see :func:`effst.slif`).
        spike_dtype: None (spikes in the input's dtype), torch.uint8 or torch.bool (one byte
            per spike: a plain byte tensor without a gradient needed, else a SpikeBytes that
            keeps the surrogate gradient path; see :func:`effst.slif`).

    Options are validated here, once; the launch plan (parameter layouts, backend, grids) is
    worked out on the first call for each input shape/dtype/device and reused after that.
    """

    def __init__(
        self,
        tau: float = 2.0,
        v_threshold: float = 1.0,
        v_reset: Optional[float] = 0.0,
        surrogate: str = "atan",
        alpha: Optional[float] = None,
        detach_reset: bool = False,
        decay_input: bool = True,
        learn_tau: bool = True,
        learn_threshold: bool = True,
        channels: Optional[int] = None,
        channel_dim: int = -1,
        backend: str = "auto",
        spike_dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        self._plans: dict = {}
        tau = check_tau(tau)
        if isinstance(v_threshold, bool) or not isinstance(v_threshold, (int, float)):
            raise TypeError(f"v_threshold: expected a float, got {type(v_threshold).__name__}")
        if v_reset is not None and (isinstance(v_reset, bool) or not isinstance(v_reset, (int, float))):
            raise TypeError(f"v_reset: expected a float or None (soft reset), got {type(v_reset).__name__}")
        for value, name in ((v_threshold, "v_threshold"), (v_reset, "v_reset")):
            if value is not None and not math.isfinite(value):  # NaN/inf: a neuron that never (or always) fires
                raise ValueError(f"{name}: expected a finite value, got {value}")
        if channels is not None and (isinstance(channels, bool) or not isinstance(channels, int) or channels < 1):
            raise ValueError(f"channels: expected None (per layer) or a positive int, got {channels!r}")
        if isinstance(channel_dim, bool) or not isinstance(channel_dim, int):
            raise TypeError(f"channel_dim: expected an int, got {type(channel_dim).__name__}")
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {list(BACKENDS)}, got {backend!r}")
        for flag, name in ((detach_reset, "detach_reset"), (decay_input, "decay_input"),
                           (learn_tau, "learn_tau"), (learn_threshold, "learn_threshold")):
            if not isinstance(flag, bool):
                raise TypeError(f"{name}: expected a bool, got {type(flag).__name__}")
        check_spike_dtype(spike_dtype)
        self.spike_dtype = spike_dtype
        self.surrogate_id, self.alpha = resolve_surrogate(surrogate, alpha)
        self.surrogate = surrogate
        self.v_reset = None if v_reset is None else float(v_reset)
        self.detach_reset = detach_reset
        self.decay_input = decay_input
        self.channels = channels
        self.channel_dim = channel_dim
        self.backend = backend
        self.step_mode = "m"
        shape = () if channels is None else (channels,)
        w = torch.full(shape, tau_to_w(tau), dtype=torch.float32)
        theta = torch.full(shape, float(v_threshold), dtype=torch.float32)
        if learn_tau:
            self.w = nn.Parameter(w)
        else:
            self.register_buffer("w", w)
        if learn_threshold:
            self.v_threshold = nn.Parameter(theta)
        else:
            self.register_buffer("v_threshold", theta)
        self.v: Union[float, torch.Tensor] = self._rest_potential()

    # -- state ---------------------------------------------------------------------------
    def _rest_potential(self) -> float:
        return 0.0 if self.v_reset is None else self.v_reset

    def reset(self) -> None:
        """Forget the membrane state (SpikingJelly's ``reset_net`` calls this)."""
        self.__dict__["v"] = self._rest_potential()  # see __setattr__

    @property
    def tau(self) -> torch.Tensor:
        """Membrane time constant ``1 / sigmoid(w)`` (a tensor, differentiable)."""
        return w_to_tau(self.w)

    @property
    def learn_tau(self) -> bool:
        return isinstance(self.w, nn.Parameter)

    @property
    def learn_threshold(self) -> bool:
        return isinstance(self.v_threshold, nn.Parameter)

    # -- forward -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Spikes for ``x = [T, ...]`` (step_mode 'm') or ``x = [...]`` (step_mode 's')."""
        mode = self.step_mode
        if mode == "m":
            return self._multi_step(x)
        if mode == "s":
            return self._multi_step(x.unsqueeze(0)).squeeze(0)
        raise ValueError(f"step_mode: expected 'm' or 's', got {mode!r}")

    def __getstate__(self) -> dict:
        # Copies (copy.deepcopy, pickling) take the membrane state detached from the step's
        # autograd graph (a non-leaf tensor cannot be deep-copied) and no launch plans (caches
        # that may hold compiled kernels; rebuilt on the first call).
        state = self.__dict__.copy()
        if isinstance(state.get("v"), torch.Tensor):
            state["v"] = state["v"].detach()
        state["_plans"] = {}
        return state

    def _apply(self, fn, *args, **kwargs):
        # .to() / .cuda() / .double(): plans were validated against the parameters' device
        self.__dict__.get("_plans", {}).clear()
        return super()._apply(fn, *args, **kwargs)

    def __setattr__(self, name, value):
        if name == "v":
            # The membrane state is a plain attribute (never a Parameter, buffer or module):
            # skip nn.Module's registry checks, set on every forward and reset.
            object.__setattr__(self, name, value)
            return
        if name in _PLAN_OPTIONS and "_plans" in self.__dict__:
            self.__dict__["_plans"].clear()
        super().__setattr__(name, value)

    def _plan_for(self, x: torch.Tensor) -> Optional[SLIFPlan]:
        """Validate ``x`` against the options and plan its launch (None: the reference runs)."""
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"x: expected a float16/bfloat16/float32/float64 tensor [T, *], got "
                            f"{x.dtype}")
        if x.dim() < 1 or x.shape[0] == 0:
            raise ValueError(f"x: expected shape [T, *] with T >= 1, got {tuple(x.shape)}")
        if self.channels is None and x.dim() >= 2:
            normalize_channel_dim(self.channel_dim, x.dim() - 1)  # unused here, but never bad
        if self.channels is not None:
            if x.dim() < 2:
                raise ValueError(f"x: expected [T, *] with a per-step dim of {self.channels} "
                                 f"channels, got shape {tuple(x.shape)}")
            dim = normalize_channel_dim(self.channel_dim, x.dim() - 1)
            if x.shape[1 + dim] != self.channels:
                raise ValueError(
                    f"x: expected {self.channels} channels along per-step dim {self.channel_dim}, "
                    f"got shape {tuple(x.shape)} (T first)")
        for tensor, name in ((self.w, "w"), (self.v_threshold, "v_threshold")):
            if tensor.device != x.device:
                raise ValueError(f"x: expected a tensor on {tensor.device} (where the module's "
                                 f"{name} is), got {x.device}")
        backend = resolve_backend(self.backend, x.device)
        if backend == "reference":
            return None
        step_shape = x.shape[1:]
        return make_plan(
            backend, tuple(x.shape), x.dtype,
            resolve_parameter_layout(self.w.shape, step_shape, self.channel_dim, "w"),
            resolve_parameter_layout(self.v_threshold.shape, step_shape, self.channel_dim,
                                     "v_threshold"),
            self.v_reset, self.surrogate_id, self.alpha, self.detach_reset, self.decay_input,
            self.spike_dtype)

    def _tensor(self, name: str) -> torch.Tensor:
        """``self.w`` / ``self.v_threshold`` without nn.Module.__getattr__'s slow path."""
        tensor = self._parameters.get(name)
        if tensor is None:
            tensor = self._buffers.get(name)
            if tensor is None:  # e.g. moved by torch.nn.utils.parametrize
                tensor = getattr(self, name)
        return tensor

    def _multi_step(self, x: torch.Tensor) -> torch.Tensor:
        # The per-call path: one dict lookup for the plan (validated and made on the first
        # call for each shape/dtype/device), the state, one fused call.
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a tensor [T, *], got {type(x).__name__}")
        key = (x.shape, x.dtype, x.device)
        try:
            plan = self._plans[key]
        except KeyError:
            plan = self._plans[key] = self._plan_for(x)
        w = self._tensor("w")
        theta = self._tensor("v_threshold")
        state = self.v
        if isinstance(state, torch.Tensor) and state.shape != x.shape[1:]:
            raise self._state_shape_error(x, state)
        if plan is None:  # the reference backend
            rest = self._rest_potential()
            if isinstance(state, torch.Tensor) and _in_backward_pass():  # (fused: _initial_membrane)
                raise self._recompute_error()
            v_init = state if isinstance(state, torch.Tensor) or state != rest else None
            spikes, self.__dict__["v"] = slif(
                x, w, theta, v_reset=self.v_reset, v_init=v_init,
                surrogate=self.surrogate, alpha=self.alpha, detach_reset=self.detach_reset,
                decay_input=self.decay_input, channel_dim=self.channel_dim, backend="reference",
                return_state=True, spike_dtype=self.spike_dtype)
            return spikes
        v_init = self._initial_membrane((plan.N,), plan.compute_dtype, x.device)
        spikes, self.__dict__["v"] = slif_with_plan(x, w, theta, v_init, plan)
        return spikes

    def _initial_membrane(self, shape, dtype: torch.dtype, device) -> Optional[torch.Tensor]:
        """The membrane a kernel starts from: None at rest, else the stored state as a ``dtype``
        tensor (a float state filled into ``shape``). The fused token-routed neuron uses it too."""
        state = self.v
        if isinstance(state, torch.Tensor):
            if _in_backward_pass():
                raise self._recompute_error()
            return state if state.dtype == dtype else state.to(dtype)
        if state != self._rest_potential():
            return torch.full(shape, float(state), dtype=dtype, device=device)
        return None

    @staticmethod
    def _recompute_error() -> RuntimeError:
        # A forward inside a backward pass is a recompute (torch.utils.checkpoint): it would
        # start from the state the first forward left behind, not the one that forward started
        # from, and give silently wrong gradients.
        return RuntimeError(
            "SLIF: called during a backward pass (a torch.utils.checkpoint recompute?) with a "
            "stored membrane state: the recompute would start from the state the first forward "
            "left, not the one it started from. Reset the neurons first thing inside the "
            "checkpointed function (effst.nn.reset / functional.reset_net), or do not checkpoint "
            "stateful neurons")

    @staticmethod
    def _state_shape_error(x: torch.Tensor, state: torch.Tensor) -> ValueError:
        return ValueError(
            f"x: per-step shape {tuple(x.shape[1:])} differs from the stored membrane "
            f"state {tuple(state.shape)}; call reset() (or functional.reset_net) between batches")

    def extra_repr(self) -> str:
        form = "per layer" if self.channels is None else f"per channel (C={self.channels}, dim={self.channel_dim})"
        tau = self.tau.detach()
        theta = self.v_threshold.detach()
        describe = (lambda t: f"{t.item():.4g}" if t.numel() == 1 else
                    f"[{t.min().item():.4g}..{t.max().item():.4g}]")
        reset = "soft" if self.v_reset is None else f"hard to {self.v_reset:g}"
        return (f"tau={describe(tau)}{' (learned)' if self.learn_tau else ''}, "
                f"v_threshold={describe(theta)}{' (learned)' if self.learn_threshold else ''}, "
                f"{form}, reset={reset}, surrogate={self.surrogate}(alpha={self.alpha:g}), "
                f"detach_reset={self.detach_reset}, decay_input={self.decay_input}, backend={self.backend}")


class PLIF(SLIF):
    """Parametric LIF: learned time constant, fixed threshold (SpikingJelly's PLIF, fused)."""

    def __init__(self, tau: float = 2.0, v_threshold: float = 1.0, v_reset: Optional[float] = 0.0,
                 surrogate: str = "atan", alpha: Optional[float] = None, detach_reset: bool = False,
                 decay_input: bool = True, channels: Optional[int] = None, channel_dim: int = -1,
                 backend: str = "auto", spike_dtype: Optional[torch.dtype] = None):
        super().__init__(tau, v_threshold, v_reset, surrogate, alpha, detach_reset, decay_input,
                         learn_tau=True, learn_threshold=False, channels=channels,
                         channel_dim=channel_dim, backend=backend, spike_dtype=spike_dtype)


class LIF(SLIF):
    """Leaky integrate-and-fire with fixed time constant and threshold (per layer)."""

    def __init__(self, tau: float = 2.0, v_threshold: float = 1.0, v_reset: Optional[float] = 0.0,
                 surrogate: str = "atan", alpha: Optional[float] = None, detach_reset: bool = False,
                 decay_input: bool = True, backend: str = "auto",
                 spike_dtype: Optional[torch.dtype] = None):
        super().__init__(tau, v_threshold, v_reset, surrogate, alpha, detach_reset, decay_input,
                         learn_tau=False, learn_threshold=False, channels=None, backend=backend,
                         spike_dtype=spike_dtype)


def reset(model: nn.Module) -> None:
    """Reset the membrane state of every spiking neuron in ``model``."""
    for module in model.modules():
        if isinstance(module, SLIF):
            module.reset()
        elif module is not model and hasattr(module, "reset") and hasattr(module, "v"):
            module.reset()  # SpikingJelly nodes and other memory modules
