"""Ahead-of-time compilation of Triton kernels for real GPU targets, without a GPU.

Run as a subprocess (the Triton interpreter, which the test process uses, replaces
@triton.jit functions and cannot compile): ``python tests/aot_compile.py SPEC_JSON`` where the
spec lists ``{"module", "kernel", "signature", "constexprs", "arch"}`` entries (and optionally
``"options"``, e.g. ``{"num_warps": 4}``). Prints one JSON
line per entry with the outcome, and exits non-zero if any failed.
"""
import importlib
import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402


def compile_entry(entry: dict) -> dict:
    module = importlib.import_module(entry["module"])
    kernel = getattr(module, entry["kernel"])
    constexprs = {}
    for name, value in entry["constexprs"].items():
        # dtype constexprs travel as "tl.float32" strings
        if isinstance(value, str) and value.startswith("tl."):
            value = getattr(triton.language, value[3:])
        constexprs[name] = value
    signature = dict(entry["signature"])
    for name in constexprs:
        signature[name] = "constexpr"
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    # "options" (e.g. num_warps) as the launcher passes them: they change the generated code
    compiled = triton.compile(source, target=GPUTarget("cuda", entry["arch"], 32),
                              options=entry.get("options") or None)
    return {"kernel": entry["kernel"], "arch": entry["arch"], "ok": True,
            "ptx_bytes": len(compiled.asm["ptx"])}


def main() -> int:
    entries = json.loads(sys.argv[1] if len(sys.argv) > 1 else sys.stdin.read())
    failed = 0
    for entry in entries:
        try:
            result = compile_entry(entry)
        except Exception as error:  # report and go on, so one run shows every failure
            failed += 1
            result = {"kernel": entry["kernel"], "arch": entry["arch"], "ok": False,
                      "constexprs": entry["constexprs"], "error": f"{type(error).__name__}: {error}"[:2000]}
        print(json.dumps(result), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
