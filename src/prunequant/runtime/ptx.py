"""The runtime's Triton kernels compiled for a CUDA GPU without one: launches are captured from the real
dispatch code (``captured``), handed to Triton's CUDA backend for a chosen architecture (``compile_launch``),
and ptxas reports their registers and spills (``resources``). Tests use it to check that every kernel the
runtime launches compiles for Hopper; ``benchmarks/kernel_resources.py`` to see which tiles spill."""
from __future__ import annotations

import contextlib
from collections import Counter
import os
import re
import subprocess
import tempfile

import torch

from . import triton_wmm as tw

KERNELS = ("_gemv_kernel", "_cat_kernel", "_gemv_rows_kernel", "_sdot_kernel", "_pdot_kernel",
           "_wmm_kernel", "_dequant_words_kernel", "_dequant_kernel")
_PTR = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int32: "*i32",
        torch.uint8: "*u8", torch.int64: "*i64"}


class _Capture:
    """Stands in for a @triton.jit kernel: records each launch instead of running it."""

    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.kernel, args, kwargs))


@contextlib.contextmanager
def captured():
    """Inside, the runtime's kernel launches are recorded as (kernel, args, kwargs) in the list yielded."""
    launches: list = []
    saved = {name: getattr(tw, name) for name in KERNELS}
    try:
        for name, kernel in saved.items():
            setattr(tw, name, _Capture(kernel, launches))
        yield launches
    finally:
        for name, kernel in saved.items():
            setattr(tw, name, kernel)


def compile_launch(kernel, args, kwargs, arch: int = 90):
    """Compile one captured launch for CUDA compute capability ``arch`` (e.g. 90 = Hopper)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kwargs = dict(kwargs)
    opts = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    values = dict(zip(kernel.arg_names, args), **kwargs)
    sig, const = {}, {}
    for i, name in enumerate(kernel.arg_names):
        v = values[name]
        if kernel.params[i].is_constexpr:
            sig[name], const[(i,)] = "constexpr", v
        else:
            sig[name] = _PTR[v.dtype] if torch.is_tensor(v) else "i32"
    return triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=const),
                          target=GPUTarget("cuda", arch, 32), options=opts)


def _ptxas(compiled, arch: int, out: str) -> str:
    """Assemble the kernel's PTX for sm_``arch``a into ``out``; returns ptxas's report (-v)."""
    import triton

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(compiled.asm["ptx"])
        for name in ("ptxas", "ptxas-blackwell"):  # the newer one reads the PTX versions the older does not
            r = subprocess.run([os.path.join(bin_dir, name), f"-arch=sm_{arch}a", "-v", src, "-o", out],
                               capture_output=True, text=True)
            if r.returncode == 0:
                return r.stderr
    last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"
    raise RuntimeError(f"ptxas failed: {last}")


def resources(compiled, arch: int = 90) -> dict:
    """{"registers", "spill_bytes", "shared_bytes"} of a compiled kernel, from ptxas -v."""
    report = _ptxas(compiled, arch, os.devnull)
    return {"shared_bytes": compiled.metadata.shared,
            "registers": int(re.search(r"Used (\d+) registers", report).group(1)),
            "spill_bytes": int(re.search(r"(\d+) bytes spill stores", report).group(1))}


def loop_mix(compiled, arch: int = 90) -> dict:
    """The machine instructions (SASS, from ptxas and nvdisasm) of the kernel's longest loop body:
    {"instructions": n, "ops": {opcode: count}}; a static profile of what each trip of the k-loop issues."""
    import triton

    with tempfile.TemporaryDirectory() as d:
        cubin = os.path.join(d, "k.cubin")
        _ptxas(compiled, arch, cubin)
        nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
        sass = subprocess.run([nvdisasm, "-c", cubin], capture_output=True, text=True, check=True).stdout
    body, labels, loops = [], {}, []
    for line in sass.splitlines():
        m = re.match(r"\s*(\.L_x_\d+):", line)
        if m:
            labels[m.group(1)] = len(body)
            continue
        m = re.search(r"/\*[0-9a-f]{4}\*/\s+(.*?)\s*;", line)
        if not m:
            continue
        body.append(re.sub(r"^@!?U?P\w+\s+", "", m.group(1)).split()[0].split(".")[0])
        target = re.search(r"BRA\s+`?\(?(\.L_x_\d+)", m.group(1))
        if target and labels.get(target.group(1), len(body)) < len(body) - 1:  # a backward branch: a loop
            loops.append(body[labels[target.group(1)]:])
    if not loops:
        return {"instructions": 0, "ops": {}}
    longest = max(loops, key=len)
    return {"instructions": len(longest), "ops": dict(Counter(longest).most_common())}
