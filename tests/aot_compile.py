"""Ahead-of-time compilation of Triton kernels for real GPU targets, without a GPU.

Run as a subprocess (the Triton interpreter, which the test process uses, replaces
@triton.jit functions and cannot compile): ``python tests/aot_compile.py SPEC_JSON`` where the
spec lists ``{"module", "kernel", "signature", "constexprs", "arch"}`` entries, optionally with
``"name"``, ``"options"`` (e.g. ``{"num_warps": 4}``: they change the generated code), the
launch-time specialisation Triton's JIT makes (``"divisible_by_16"``: integer arguments the JIT
sees divisible by 16, with it every pointer is taken 16-byte aligned; ``"equal_to_1"``: integer
arguments folded to the constant 1, kept in place so the hints stay positional), and
``"resources": true`` / ``"sass": true`` to read the cubin with ``cuobjdump`` (registers,
stack, local and shared memory per thread / block; the SASS opcodes in order). Prints one JSON
line per entry with the outcome, and exits non-zero if any failed.

From a test, :func:`resource_usage` runs that subprocess and returns the usage per entry name.
"""
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cuobjdump(cubin: bytes, flag: str) -> str:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        return subprocess.run([tool, flag, f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)


def compile_entry(entry: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module = importlib.import_module(entry["module"])
    kernel = getattr(module, entry["kernel"])
    constexprs = {}
    for name, value in entry["constexprs"].items():
        # dtype constexprs travel as "tl.float32" strings
        if isinstance(value, str) and value.startswith("tl."):
            value = getattr(triton.language, value[3:])
        constexprs[name] = value
    signature = dict(entry["signature"])
    names = list(signature)
    attrs = None
    if "divisible_by_16" in entry:  # the JIT's specialisation: aligned pointers, listed ints
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
                 if signature[n].startswith("*") or n in entry["divisible_by_16"]}
    for name in entry.get("equal_to_1") or []:
        constexprs[name] = 1
    for name in constexprs:
        signature[name] = "constexpr"
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", entry["arch"], 32),
                              options=entry.get("options") or None)
    result = {"name": entry.get("name"), "kernel": entry["kernel"], "arch": entry["arch"], "ok": True,
              "ptx_bytes": len(compiled.asm["ptx"])}
    if entry.get("resources"):
        usage = _cuobjdump(compiled.asm["cubin"], "-res-usage")
        result.update({key: int(re.search(key + r":(\d+)", usage).group(1)) for key in ("REG", "STACK", "LOCAL")})
        result["SHARED"] = compiled.metadata.shared
    if entry.get("sass"):
        sass = _cuobjdump(compiled.asm["cubin"], "-sass")
        result["ops"] = re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", sass)
    return result


def resource_usage(entries: list, arch: int = 90, sass: bool = False, timeout: float = 600) -> dict:
    """Compile each entry (named by its ``"name"``) for sm_``arch`` in a subprocess and return
    ``{name: {"REG", "STACK", "LOCAL", "SHARED", ...}}`` (``"ops"``, the SASS opcodes, with
    ``sass``). Fails with the compiler's errors if any entry does not compile."""
    names = [entry["name"] for entry in entries]
    assert len(set(names)) == len(names), f"entry names repeat: {names}"
    spec = [dict(entry, arch=arch, resources=True, sass=sass) for entry in entries]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, __file__, json.dumps(spec)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    failures = [r for r in results if not r["ok"]]
    assert not failures, json.dumps(failures, indent=1)
    assert proc.returncode == 0 and [r["name"] for r in results] == names, proc.stderr[-3000:]
    return {r["name"]: r for r in results}


def main() -> int:
    entries = json.loads(sys.argv[1] if len(sys.argv) > 1 else sys.stdin.read())
    failed = 0
    for entry in entries:
        try:
            result = compile_entry(entry)
        except Exception as error:  # report and go on, so one run shows every failure
            failed += 1
            result = {"name": entry.get("name"), "kernel": entry["kernel"], "arch": entry["arch"], "ok": False,
                      "constexprs": entry["constexprs"], "error": f"{type(error).__name__}: {error}"[:2000]}
        print(json.dumps(result), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    # before anything imports triton or a kernel module: compile, do not interpret
    os.environ.pop("TRITON_INTERPRET", None)
    sys.exit(main())
