"""On a GPU: the Triton GPTQ column loop vs the torch loop on one 7B-shaped layer (codes, error, time),
and the bf16 -> float32 Gram product used for Hessians. Exit code 1 if the kernel disagrees."""
import os
import sys
import time

import torch

from prunequant.engine import gram
from prunequant.recipe import QuantSpec
from prunequant.solvers.base import LayerStats
from prunequant.solvers.quant import gptq_quantize

torch.manual_seed(0)
from prunequant.solvers import triton_gptq  # noqa: E402

try:  # call the kernel directly: the solvers fall back to the torch loop quietly if it does not compile
    z = torch.zeros(64, 1, device="cuda")
    triton_gptq.gptq_columns(torch.randn(64, 128, device="cuda"), torch.eye(128, device="cuda"), z + 0.1, z + 8,
                             torch.zeros(128, dtype=torch.int32, device="cuda"), None,
                             torch.empty(64, 128, device="cuda"), torch.empty(64, 128, device="cuda"), 0, 128, 15)
    torch.cuda.synchronize()
    print("triton kernel: compiled and ran")
except Exception as e:  # noqa: BLE001
    print(f"triton kernel FAILED: {type(e).__name__}: {e}")
    sys.exit(1)
x = torch.randn(16384, 4096, device="cuda").bfloat16()
t = time.perf_counter(); h = gram(x); torch.cuda.synchronize(); tg = time.perf_counter() - t
ref = x.double().T @ x.double()
print(f"gram bf16->fp32: rel err {float((h.double() - ref).norm() / ref.norm()):.2e}, {tg*1e3:.1f} ms (first call)")
W = torch.randn(4096, 4096, device="cuda") * 0.02
stats = LayerStats(hessian=h / x.shape[0], sq_norm=None, n_tokens=x.shape[0])
ok = True
for act in (False, True):
    spec = QuantSpec(method="gptq", bits=4, group_size=128, act_order=act, symmetric=act)
    res = {}
    for mode in ("triton", "torch"):
        os.environ.pop("PRUNEQUANT_NO_TRITON", None)
        if mode == "torch":
            os.environ["PRUNEQUANT_NO_TRITON"] = "1"
        gptq_quantize(W, stats, spec)  # warm-up / compile
        torch.cuda.synchronize(); t = time.perf_counter()
        r = gptq_quantize(W, stats, spec)
        torch.cuda.synchronize(); res[mode] = (r, time.perf_counter() - t)
    (a, ta), (b, tb) = res["triton"], res["torch"]
    same = float((a.quant.codes == b.quant.codes).float().mean())
    rel = abs(a.info["error"] - b.info["error"]) / b.info["error"]
    print(f"gptq 4096x4096 act_order={act}: triton {ta:.3f} s, torch loop {tb:.3f} s, same codes {same:.5f}, "
          f"error rel diff {rel:.2e}")
    ok &= same > 0.999 and rel < 1e-3
os.environ.pop("PRUNEQUANT_NO_TRITON", None)
sys.exit(0 if ok else 1)
