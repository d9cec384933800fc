"""Shared sLIF test cases: a covering set of configurations and a float64 comparison helper.

Used by the Triton tests (under the interpreter) and the native-backend tests, so both fused
paths are checked against the autograd reference on the same configurations.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional

import torch

from effst import slif
from effst.ops.surrogates import SURROGATE_NAMES


@dataclass(frozen=True)
class Case:
    T: int
    step_shape: tuple
    w_form: str  # layer | channel | neuron
    theta_form: str
    v_reset: Optional[float]
    detach_reset: bool
    decay_input: bool
    surrogate: str
    with_v_init: bool
    with_grad_v_final: bool
    channel_dim: int = -1

    def __str__(self) -> str:
        reset = "soft" if self.v_reset is None else f"hard{self.v_reset:g}"
        return (f"T{self.T}-{'x'.join(map(str, self.step_shape))}-w{self.w_form}-th{self.theta_form}"
                f"-{reset}-det{int(self.detach_reset)}-dec{int(self.decay_input)}-{self.surrogate}"
                f"-v0{int(self.with_v_init)}-gv{int(self.with_grad_v_final)}-cd{self.channel_dim}")


STEP_SHAPES = [((3, 5), -1), ((2, 3, 7), 1), ((13,), 0), ((4, 1, 6), -1), ((5, 11), 0)]
FORMS = ["layer", "channel", "neuron"]


def covering_cases() -> list[Case]:
    """Every (T, reset, detach, decay) combination; the other factors cycle through their values."""
    cases = []
    resets = [0.0, -0.3, None]
    for i, (T, v_reset, detach, decay) in enumerate(
            itertools.product([1, 2, 3, 8, 17], resets, [False, True], [True, False])):
        shape, channel_dim = STEP_SHAPES[i % len(STEP_SHAPES)]
        cases.append(Case(
            T=T, step_shape=shape, w_form=FORMS[i % 3], theta_form=FORMS[(i // 3) % 3],
            v_reset=v_reset, detach_reset=detach, decay_input=decay,
            surrogate=SURROGATE_NAMES[i % len(SURROGATE_NAMES)], with_v_init=i % 2 == 0,
            with_grad_v_final=(i // 2) % 2 == 0, channel_dim=channel_dim))
    return cases


def surrogate_cases() -> list[Case]:
    """Each surrogate with both resets, long enough to cross a chunk boundary."""
    return [Case(T=11, step_shape=(3, 7), w_form="channel", theta_form="neuron", v_reset=v_reset,
                 detach_reset=False, decay_input=True, surrogate=name, with_v_init=True,
                 with_grad_v_final=True)
            for name in SURROGATE_NAMES for v_reset in (0.0, None)]


def make_inputs(case: Case, seed: int) -> dict:
    """Fresh float64 inputs for a case: x, parameters, v_init and the incoming gradients."""
    g = torch.Generator().manual_seed(seed)
    shape = case.step_shape
    channel_size = shape[case.channel_dim]

    def parameter(form: str, low: float, high: float) -> torch.Tensor:
        size = {"layer": (), "channel": (channel_size,), "neuron": shape}[form]
        return low + (high - low) * torch.rand(size, generator=g, dtype=torch.float64)

    return {
        "x": torch.randn((case.T,) + shape, generator=g, dtype=torch.float64) * 1.5 + 0.6,
        "w": parameter(case.w_form, -1.5, 1.5),
        "theta": parameter(case.theta_form, 0.4, 1.4),
        "v_init": (0.4 * torch.randn(shape, generator=g, dtype=torch.float64)
                   if case.with_v_init else None),
        "grad_spikes": torch.randn((case.T,) + shape, generator=g, dtype=torch.float64),
        "grad_v_final": torch.randn(shape, generator=g, dtype=torch.float64),
    }


def run_case(case: Case, inputs: dict, backend: str, dtype: torch.dtype, device: str = "cpu",
             x_transform=None) -> dict:
    """Forward + backward of one backend; returns spikes, final state and every gradient (fp64, CPU)."""
    x = inputs["x"].to(device=device, dtype=dtype, copy=True)
    if x_transform is not None:
        with torch.no_grad():
            x = x_transform(x)  # still a leaf, just laid out differently
    x.requires_grad_(True)
    w = inputs["w"].to(device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32, copy=True).requires_grad_(True)
    theta = inputs["theta"].to(device=device, dtype=w.dtype, copy=True).requires_grad_(True)
    v_init = None
    if inputs["v_init"] is not None:
        v_init = inputs["v_init"].to(device=device, dtype=w.dtype, copy=True).requires_grad_(True)
    spikes, v_final = slif(x, w, theta, v_reset=case.v_reset, v_init=v_init,
                           surrogate=case.surrogate, detach_reset=case.detach_reset,
                           decay_input=case.decay_input, channel_dim=case.channel_dim,
                           backend=backend, return_state=True)
    loss = (spikes.to(torch.float64) * inputs["grad_spikes"].to(device)).sum()
    if case.with_grad_v_final:
        loss = loss + (v_final.to(torch.float64) * inputs["grad_v_final"].to(device)).sum()
    loss.backward()
    out = {"spikes": spikes, "v_final": v_final, "grad_x": x.grad, "grad_w": w.grad,
           "grad_theta": theta.grad, "grad_v_init": v_init.grad if v_init is not None else None}
    return {k: (v.detach().to("cpu", torch.float64, copy=True) if v is not None else None) for k, v in out.items()}


def reference_for(case: Case, inputs: dict, dtype: torch.dtype) -> dict:
    """The float64 autograd reference on inputs rounded to ``dtype`` first (what the kernel sees)."""
    rounded = dict(inputs)
    rounded["x"] = inputs["x"].to(dtype).to(torch.float64)
    if dtype != torch.float64:
        for name in ("w", "theta", "v_init"):
            if rounded[name] is not None:
                rounded[name] = inputs[name].to(torch.float32).to(torch.float64)
    return run_case(case, rounded, "reference", torch.float64)


TOLERANCES = {  # (rtol, atol relative to the reference's largest magnitude)
    torch.float64: 1e-9,
    torch.float32: 2e-4,
    torch.float16: 4e-3,
    torch.bfloat16: 3e-2,
}


def assert_matches(result: dict, expected: dict, dtype: torch.dtype, context: str = "") -> None:
    """Spikes exactly equal; states and gradients within the dtype's tolerance."""
    torch.testing.assert_close(result["spikes"], expected["spikes"], rtol=0, atol=0,
                               msg=lambda m: f"{context} spikes differ: {m}")
    tol = TOLERANCES[dtype]
    for name in ("v_final", "grad_x", "grad_w", "grad_theta", "grad_v_init"):
        got, want = result[name], expected[name]
        if want is None:
            assert got is None, f"{context} {name}: expected no gradient"
            continue
        assert got is not None and got.shape == want.shape, f"{context} {name}: shape {None if got is None else got.shape} != {want.shape}"
        scale = max(want.abs().max().item(), 1.0)
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * scale,
                                   msg=lambda m, n=name: f"{context} {n}: {m}")
