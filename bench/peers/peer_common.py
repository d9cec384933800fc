"""What every peer runner does the same way: read the request, check isolation, answer.

Imported by the runner scripts next to it (a script's own folder is first on sys.path); it
imports nothing but the standard library, so it works in any peer environment.
"""
import importlib.util
import json
import os
import sys
import traceback

MARKER = "EFFST_PEER_RESULT "  # effst.benchmarks.peers.RESULT_MARKER


def read_request():
    """The JSON request: from the file named by argv[1], else from stdin."""
    if len(sys.argv) > 1:
        with open(sys.argv[1]) as f:
            return json.load(f)
    return json.load(sys.stdin)


def emit(payload):
    """Print the one result line the harness looks for."""
    sys.stdout.write(MARKER + json.dumps(payload) + "\n")
    sys.stdout.flush()


def error_text(exc, limit=2000):
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[:limit] + " ..."


def load_module(path, name):
    """Import a Python file by path (effst's timing module, a bench suite)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


NUMPY_INT_NOTE = ("numpy.int = int set in this peer's subprocess only (NumPy >= 1.24 removed the alias; "
                  "SpikingJelly 0.0.0.0.14's cupy kernels use it)")


def apply_numpy_int_compat():
    """Give NumPy back ``numpy.int`` (= ``int``) where it is missing; returns whether it was set.

    Only this alias: NumPy 2 has a real ``numpy.bool`` and replacing it breaks CuPy's import.
    """
    import numpy

    if "int" in vars(numpy):
        return False
    numpy.int = int
    return True


def import_spikingjelly(request):
    """Import spikingjelly and check it is the expected version from the expected directory.

    With ``request['numpy_int_compat']`` the ``numpy.int`` alias is restored first (see
    :func:`apply_numpy_int_compat`); ``request['numpy_int_compat_applied']`` records whether it
    was needed. Returns ``(spikingjelly_module, version, None)`` or ``(None, None, error_payload)``.
    """
    request["numpy_int_compat_applied"] = False
    try:
        if request.get("numpy_int_compat"):
            request["numpy_int_compat_applied"] = apply_numpy_int_compat()
        import spikingjelly
        from spikingjelly.activation_based import functional, neuron, surrogate  # noqa: F401
    except BaseException as exc:  # an import failure is the result, not a crash
        return None, None, {"ok": False,
                            "error": "cannot import spikingjelly in the peer environment: " + error_text(exc),
                            "traceback": traceback.format_exc()[-3000:]}
    from importlib import metadata

    try:
        version = metadata.version("spikingjelly")
    except metadata.PackageNotFoundError:
        version = None
    location = os.path.dirname(os.path.dirname(os.path.abspath(spikingjelly.__file__)))
    expected_dir = os.path.abspath(request["expect_location"])
    if os.path.realpath(location) != os.path.realpath(expected_dir) or version != request["expect_version"]:
        return None, None, {"ok": False, "error": (
            f"isolation check failed: imported spikingjelly {version} from {location}, "
            f"expected {request['expect_version']} from {expected_dir}")}
    return spikingjelly, version, None
