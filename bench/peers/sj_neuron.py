"""Peer runner: times SpikingJelly LIF / PLIF forward+backward inside the peer's own environment.

Runs as a script (never imported by effst), with the peer's install directory first on
PYTHONPATH; works for SpikingJelly 2.0.0 and 0.0.0.0.14. Reads one JSON request on stdin
(or from the file named by argv[1]) and prints one line ``EFFST_PEER_RESULT <json>``.

Request fields:
    peer, expect_version, expect_location  -- isolation check: the spikingjelly imported must be
                                              this version, from this directory
    timing_module                          -- path of effst/benchmarks/timing.py (loaded by path,
                                              so both sides time the same way on the same inputs)
    device ('cpu'|'cuda'), threads (int|None), seed
    backend                                -- 0.0.0.0.14 only: 'torch' or 'cupy' (None for 2.0.0,
                                              whose CUDA kernel is its own default choice unless the
                                              harness passes SJ_*_CUDA_IMPLEMENTATION)
    numpy_int_compat                       -- restore numpy.int before importing (0.0.0.0.14)
    neuron  {tau, v_threshold, v_reset, surrogate, alpha, detach_reset, decay_input}
    cases   [{id, neuron: 'LIF'|'PLIF', T, step_shape, dtype}]
    timing  {warmup, reps, max_seconds}
Result: {ok, error?, spikingjelly_version, spikingjelly_file, versions, threads,
        numpy_int_compat_applied, results: [{id, status: 'ok'|'error'|'unavailable', ms,
        implementation, ... | error}]}
A case whose requested implementation is not in the installed peer (2.0.0's native CUDA operators
are not built in its wheel) is ``status: 'unavailable'`` with the peer's message: that is the
peer as users install it, not a failure of the harness.
"""
import sys
import traceback

from peer_common import NUMPY_INT_NOTE, emit, error_text, import_spikingjelly, load_module, read_request

NOT_BUILT = "were not built"  # SpikingJelly 2.0.0's message when its native operators are missing

SURROGATE_CLASSES = {
    "atan": "ATan", "sigmoid": "Sigmoid", "erf": "Erf", "piecewise_quadratic": "PiecewiseQuadratic",
    "piecewise_exp": "PiecewiseExp", "soft_sign": "SoftSign", "super_spike": "SuperSpike",
}


def build_neuron(neuron_mod, surrogate_mod, case, config, backend, device):
    surrogate_cls = getattr(surrogate_mod, SURROGATE_CLASSES[config["surrogate"]])
    kwargs = dict(
        decay_input=config["decay_input"], v_threshold=config["v_threshold"],
        v_reset=config["v_reset"], surrogate_function=surrogate_cls(alpha=config["alpha"]),
        detach_reset=config["detach_reset"], step_mode="m",
    )
    if backend is not None:  # 0.0.0.0.14 selects its kernel by constructor argument
        kwargs["backend"] = backend
    if case["neuron"] == "LIF":
        module = neuron_mod.LIFNode(tau=config["tau"], **kwargs)
    elif case["neuron"] == "PLIF":
        module = neuron_mod.ParametricLIFNode(init_tau=config["tau"], **kwargs)
    else:
        raise ValueError(f"neuron: expected 'LIF' or 'PLIF', got {case['neuron']!r}")
    return module.to(device)


def failure_fields(exc):
    """Row fields for a case that raised: 'unavailable' when the peer as installed lacks the
    implementation asked for (2.0.0's wheel has no native CUDA operators), else 'error'."""
    if NOT_BUILT in str(exc):
        return {"status": "unavailable", "error": error_text(exc),
                "note": "not in the installed peer: SpikingJelly 2.0.0's wheel ships without its native CUDA "
                        "operators (built only from source); the peer as users install it"}
    return {"status": "error", "error": error_text(exc), "traceback": traceback.format_exc()[-2000:]}


def sj2_selections(neuron_name):
    """What SpikingJelly 2.0.0 chose for this neuron so far: {key: implementation name}.

    Its ops packages record each choice per CUDA device (``_selection._selections``); a fallback
    to the torch reference (e.g. half precision) is recorded under (device, reason).
    """
    import importlib

    package = {"LIF": "lif", "PLIF": "plif"}[neuron_name]
    try:
        selection = importlib.import_module(f"spikingjelly._ops.{package}")._selection
    except Exception:  # 0.0.0.0.14, or a 2.x without this layout
        return {}
    found = {}
    for key, value in dict(selection._selections).items():
        if isinstance(key, tuple):
            found[key] = f"torch-reference ({key[1]})"
        elif value is not None:
            found[key] = value.name
    return found


def main():
    request = read_request()
    spikingjelly, found_version, failure = import_spikingjelly(request)
    if failure:
        emit(failure)
        return 0
    import torch
    from spikingjelly.activation_based import functional, neuron, surrogate

    timing = load_module(request["timing_module"], "effst_bench_timing")
    device = request["device"]
    if request.get("threads"):
        torch.set_num_threads(int(request["threads"]))
    backend = request.get("backend")
    setup_error = None
    if backend == "cupy" and getattr(neuron, "cupy", None) is None:
        # 0.0.0.0.14 swallows the import error of its cupy kernels (a logging.info); surface it
        try:
            import cupy  # noqa: F401
            from spikingjelly.activation_based import cuda_utils, neuron_kernel  # noqa: F401
            setup_error = "spikingjelly could not load its cupy kernels (neuron.cupy is None)"
        except BaseException as exc:
            setup_error = "cupy backend unavailable: " + error_text(exc)
    results = []
    implementation_of = {}  # (neuron, dtype) -> what 2.0.0 chose when it first ran that profile
    for case in request["cases"]:
        row = {"id": case["id"]}
        if setup_error:
            row.update(status="error", error=setup_error)
            results.append(row)
            continue
        profile = (case["neuron"], case["dtype"])
        before = sj2_selections(case["neuron"])
        try:
            module = build_neuron(neuron, surrogate, case, request["neuron"], backend, device)
            measured = timing.time_neuron(
                module, lambda: functional.reset_net(module), T=case["T"],
                step_shape=tuple(case["step_shape"]), dtype=getattr(torch, case["dtype"]),
                device=device, seed=request["seed"], capture=backend != "cupy", **request["timing"])
            row.update(status="ok", **measured)
        except Exception as exc:  # report the failure of this case, go on with the next
            row.update(failure_fields(exc))
        finally:
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        added = {k: v for k, v in sj2_selections(case["neuron"]).items() if k not in before}
        if added:
            implementation_of[profile] = " + ".join(sorted(set(added.values())))
        if backend is not None:
            row["implementation"] = backend
        elif device.startswith("cuda"):
            row["implementation"] = implementation_of.get(profile)
        else:
            row["implementation"] = "torch"
        if request.get("numpy_int_compat_applied"):
            row["note"] = "; ".join(filter(None, [row.get("note"), NUMPY_INT_NOTE]))
        results.append(row)
    emit({"ok": True, "spikingjelly_version": found_version, "spikingjelly_file": spikingjelly.__file__,
          "versions": timing.versions(), "threads": torch.get_num_threads(),
          "numpy_int_compat_applied": request.get("numpy_int_compat_applied"), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
