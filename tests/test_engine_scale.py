"""Engine features for scale: stacked solves of shared-input linears, lazily materialised blocks,
activation offload, the Hessian Gram product, and the distributed path (world size 1 and 2 on CPU)."""
import os
import socket

import pytest
import torch

from prunequant.distributed import DistContext
from prunequant.engine import compress_model, gram
from prunequant.models import all_linear_names, get_blocks, get_weight
from prunequant.onload import BlockIO, decide_offload, gpu_bytes_needed
from prunequant.recipe import QuantSpec, Recipe
from prunequant.solvers import solve_layer
from tiny import tiny_model

RECIPE = Recipe(quant=QuantSpec(method="gptq", bits=3, group_size=32))


def calib(n=4, L=16, seed=0):
    return torch.randint(0, 300, (n, L), generator=torch.Generator().manual_seed(seed))


def _weights(model):
    return {n: get_weight(model.get_submodule(n)).detach().clone() for n in all_linear_names(model)}


def test_stacked_gptq_equals_one_linear_at_a_time():
    ids = calib()
    stacked, single = tiny_model("llama"), tiny_model("llama")
    rep_s = compress_model(stacked, ids, RECIPE.plan_for, device="cpu", progress=False)
    rep_1 = compress_model(single, ids, RECIPE.plan_for, device="cpu", progress=False,
                           solver=lambda w, s, p: solve_layer(w, s, p))  # any other solver: no stacking
    assert rep_s.layers["model.layers.0.self_attn.k_proj"].stacked == 3
    assert rep_1.layers["model.layers.0.self_attn.k_proj"].stacked is None
    ws, w1 = _weights(stacked), _weights(single)
    for name in ws:
        assert rep_s.states[name].quant.codes.shape == ws[name].shape
        same = (rep_s.states[name].quant.codes == rep_1.states[name].quant.codes).float().mean()
        assert same > 0.99, name  # float summation order may flip a rare near-tie code
        assert rep_s.layers[name].error == pytest.approx(rep_1.layers[name].error, rel=0.05, abs=1e-6)
        deq = rep_s.states[name].quant.dequantize()
        torch.testing.assert_close(ws[name], deq.to(ws[name].dtype), rtol=0, atol=1e-6)


class _LazyIO(BlockIO):
    """Blocks live on the meta device; each is materialised from a saved state dict when its turn comes."""

    def __init__(self, saved):
        super().__init__()
        self.saved, self.seen = saved, []

    def load(self, i, block, device):
        block.to_empty(device=device)
        block.load_state_dict(self.saved[i])
        self.seen.append(i)

    def unload(self, i, block):
        self.saved[i] = {k: v.detach().clone() for k, v in block.state_dict().items()}
        block.to("meta")


def test_meta_blocks_materialised_one_at_a_time_give_the_same_model():
    ids = calib()
    ref = tiny_model("llama")
    compress_model(ref, ids, RECIPE.plan_for, device="cpu", progress=False)
    lazy = tiny_model("llama")
    blocks = get_blocks(lazy)
    saved = [{k: v.clone() for k, v in b.state_dict().items()} for b in blocks]
    for b in blocks:
        b.to("meta")
    io = _LazyIO(saved)
    compress_model(lazy, ids, RECIPE.plan_for, device="cpu", progress=False, block_io=io)
    assert io.seen == [0, 1] and all(p.is_meta for p in blocks.parameters())
    for i, b in enumerate(get_blocks(ref)):
        for k, v in b.state_dict().items():
            torch.testing.assert_close(saved[i][k], v, rtol=0, atol=0)


def _placements(monkeypatch):
    """Spy on where the engine keeps the activations it feeds each block (device, pinned)."""
    import prunequant.engine as engine

    seen = []
    real = engine.run_block

    def spy(block, inputs, device, outputs):
        seen.extend((h.device.type, h.is_pinned()) for h, _ in inputs)
        return real(block, inputs, device, outputs)

    monkeypatch.setattr(engine, "run_block", spy)
    return seen


def test_offload_decision_follows_free_gpu_memory(monkeypatch):
    block = get_blocks(tiny_model("llama"))[0]
    need = gpu_bytes_needed(block, n_tokens=128 * 2048, batch_tokens=8 * 2048, hidden=64, act_bytes=2)
    assert need["activations"] == 2 * 128 * 2048 * 64 * 2 and need["solver"] > 6 * 128 * 128 * 4
    assert decide_offload(block, torch.device("cpu"), 10, 10, 64, 2) is False  # nothing to offload to
    total = sum(need.values())
    for free, offload in ((10 * total, False), (total // 2, True), (int(total / 0.9) + 1, False), (total, True)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None, f=free: (f, 10 * total))
        got = decide_offload(block, torch.device("cuda"), 128 * 2048, 8 * 2048, 64, 2)
        assert got is offload, (free, total)


def test_activations_stay_on_the_compute_device_on_cpu(monkeypatch):
    ids = calib()
    a, b = tiny_model("llama"), tiny_model("llama")
    seen = _placements(monkeypatch)
    ra = compress_model(a, ids, RECIPE.plan_for, device="cpu", offload_activations=True, progress=False)
    rb = compress_model(b, ids, RECIPE.plan_for, device="cpu", offload_activations=None, progress=False)
    assert not ra.offloaded and not rb.offloaded  # the CPU is the compute device: there is nowhere to offload
    assert seen and set(seen) == {("cpu", False)}
    assert {"capture", "forward_stats", "solve", "forward_out"} <= set(rb.timings)
    for n, w in _weights(a).items():
        torch.testing.assert_close(w, _weights(b)[n], rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="offloading needs a GPU to offload from")
def test_offloaded_activations_live_in_pinned_cpu_memory_and_give_the_same_model(monkeypatch):
    ids = calib()
    out = {}
    for offload in (True, False):
        m = tiny_model("llama")
        seen = _placements(monkeypatch)
        rep = compress_model(m, ids, RECIPE.plan_for, device="cuda", offload_activations=offload, progress=False)
        assert rep.offloaded is offload
        assert set(seen) == ({("cpu", True)} if offload else {("cuda", False)})
        assert all(p.device.type == "cpu" for p in m.parameters())  # blocks go back home after their turn
        out[offload] = _weights(m)
    for n, w in out[True].items():
        torch.testing.assert_close(w, out[False][n], rtol=0, atol=0)


def test_gram_is_xtx_in_float32():
    x = torch.randn(50, 8, dtype=torch.float32)
    torch.testing.assert_close(gram(x), x.T @ x)
    xb = x.bfloat16()
    g = gram(xb)
    assert g.dtype == torch.float32
    torch.testing.assert_close(g.double(), xb.double().T @ xb.double(), rtol=1e-5, atol=1e-4)


def test_assign_balances_and_is_deterministic():
    d = DistContext(rank=0, world=2)
    owners = d.assign([10, 1, 1, 8])
    assert owners == DistContext(rank=1, world=2).assign([10, 1, 1, 8])
    load = [sum(c for c, o in zip([10, 1, 1, 8], owners) if o == r) for r in range(2)]
    assert max(load) == 10
    assert DistContext().assign([3, 2]) == [0, 0]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out):
    import torch.distributed as tdist

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = tiny_model("llama")
        rep = compress_model(model, calib(), RECIPE.plan_for, device="cpu", progress=False,
                             dist=DistContext.from_env())
        torch.save({"codes": {n: st.quant.codes for n, st in rep.states.items()}, "layers": sorted(rep.layers)},
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        tdist.destroy_process_group()


def test_distributed_world_one_in_process_is_the_plain_path():
    import torch.distributed as tdist

    ids = calib()
    ref = tiny_model("llama")
    compress_model(ref, ids, RECIPE.plan_for, device="cpu", progress=False)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        ctx = DistContext.from_env()
        assert (ctx.rank, ctx.world) == (0, 1)
        m = tiny_model("llama")
        compress_model(m, ids, RECIPE.plan_for, device="cpu", progress=False, dist=ctx)
    finally:
        tdist.destroy_process_group()
    for n, w in _weights(ref).items():
        torch.testing.assert_close(_weights(m)[n], w, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_distributed_matches_single_process(tmp_path, world):
    import torch.multiprocessing as mp

    ref = tiny_model("llama")
    rep = compress_model(ref, calib(), RECIPE.plan_for, device="cpu", progress=False)
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    names = all_linear_names(ref)
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["layers"] == sorted(names) and sorted(got["codes"]) == sorted(names)
        for n in names:
            # other thread counts / Hessians summed over ranks: float rounding flips a rare near-tie code
            same = (got["codes"][n] == rep.states[n].quant.codes).float().mean()
            assert same > 0.98, (rank, n, float(same))
