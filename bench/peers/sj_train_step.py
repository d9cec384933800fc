"""Peer runner: one Spikformer training step with SpikingJelly's LIFNode, inside the peer's environment.

The ``train-step`` suite (effst/benchmarks/train_step.py) times effst and the SpikingJelly importable
in the harness's own process; this runner times the same model and step with another SpikingJelly
(0.0.0.0.14, ``backend='cupy'`` on the GPU) from its isolated install directory. effst itself
must be importable (the repo on PYTHONPATH, or installed): the model is effst's Spikformer with
SpikingJelly's neurons swapped in.

Request: {expect_version, expect_location, suite_module (path of effst/benchmarks/train_step.py),
          threads, numpy_int_compat (restore numpy.int first: 0.0.0.0.14's cupy kernels),
          kwargs (keyword arguments of its time_train_step: neuron, device, batch, T, dtype, reps,
          warmup, sj_backend, model, seed)}
Result:  {ok, error?, spikingjelly_file, numpy_int_compat_applied, numpy_int_note, row}
"""
import sys
import traceback

from peer_common import NUMPY_INT_NOTE, emit, error_text, import_spikingjelly, load_module, read_request


def main():
    request = read_request()
    spikingjelly, _, failure = import_spikingjelly(request)
    if failure:
        emit(failure)
        return 0
    import torch

    compat = {"numpy_int_compat_applied": request.get("numpy_int_compat_applied"),
              "numpy_int_note": NUMPY_INT_NOTE if request.get("numpy_int_compat_applied") else None}
    if request.get("threads"):
        torch.set_num_threads(int(request["threads"]))
    try:
        suite = load_module(request["suite_module"], "effst_bench_train_step")
        row = suite.time_train_step(**request["kwargs"])
    except Exception as exc:
        emit({"ok": False, "error": error_text(exc), "traceback": traceback.format_exc()[-3000:],
              "spikingjelly_file": spikingjelly.__file__, **compat})
        return 0
    emit({"ok": True, "spikingjelly_file": spikingjelly.__file__, "row": row, **compat})
    return 0


if __name__ == "__main__":
    sys.exit(main())
