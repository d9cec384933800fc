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
                                              whose CUDA kernel is chosen by SJ_*_CUDA_IMPLEMENTATION
                                              in the environment the harness passes)
    neuron  {tau, v_threshold, v_reset, surrogate, alpha, detach_reset, decay_input}
    cases   [{id, neuron: 'LIF'|'PLIF', T, step_shape, dtype}]
    timing  {warmup, reps, max_seconds}
Result: {ok, error?, spikingjelly_version, spikingjelly_file, versions, threads, results:
        [{id, status: 'ok'|'error', ms, ... | error}]}
"""
import sys
import traceback

from peer_common import emit, error_text, import_spikingjelly, load_module, read_request

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
    for case in request["cases"]:
        row = {"id": case["id"]}
        if setup_error:
            row.update(status="error", error=setup_error)
            results.append(row)
            continue
        try:
            module = build_neuron(neuron, surrogate, case, request["neuron"], backend, device)
            measured = timing.time_neuron(
                module, lambda: functional.reset_net(module), T=case["T"],
                step_shape=tuple(case["step_shape"]), dtype=getattr(torch, case["dtype"]),
                device=device, seed=request["seed"], **request["timing"])
            row.update(status="ok", **measured)
        except Exception as exc:  # report the failure of this case, go on with the next
            row.update(status="error", error=error_text(exc), traceback=traceback.format_exc()[-2000:])
        finally:
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        results.append(row)
    emit({"ok": True, "spikingjelly_version": found_version, "spikingjelly_file": spikingjelly.__file__,
          "versions": timing.versions(), "threads": torch.get_num_threads(), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
