"""llm-compressor side of benchmarks/peer_llmcompressor.py. Runs in the PEER virtual environment
(its own torch/transformers/llmcompressor), never imports prunequant.

    <peer-venv>/bin/python benchmarks/_peer_worker.py JOB.json

JOB.json: {"model_dir", "calib_ids" (a .pt (N, L) LongTensor), "modifiers": [{"type", ...kwargs}],
"batch_size", "threads", "out_weights" (.safetensors), "out_json", "pipeline"}.
Writes the compressed block weights (dense float32, as the model computes with them) and a JSON
record with the oneshot wall time and library versions.
"""
from __future__ import annotations

import json
import sys
import time


def _modifier(spec: dict):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    kind = spec["type"]
    kw = {k: v for k, v in spec.items() if k != "type"}
    if kind == "SparseGPTModifier":
        from llmcompressor.modifiers.obcq import SparseGPTModifier

        return SparseGPTModifier(**kw)
    if kind == "WandaPruningModifier":
        from llmcompressor.modifiers.pruning import WandaPruningModifier

        return WandaPruningModifier(**kw)
    if kind == "GPTQModifier":
        from llmcompressor.modifiers.quantization import GPTQModifier

        w = kw.pop("weights")
        targets = kw.pop("targets")
        scheme = QuantizationScheme(targets=targets, weights=QuantizationArgs(**w))
        return GPTQModifier(config_groups={"group_0": scheme}, **kw)
    raise ValueError(f"unknown modifier type {kind}")


def main(job_path: str) -> None:
    job = json.loads(open(job_path).read())
    import torch

    torch.set_num_threads(int(job["threads"]))
    import compressed_tensors
    import llmcompressor
    import transformers
    from llmcompressor import oneshot
    from safetensors.torch import save_file
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = torch.load(job["calib_ids"])
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(job["model_dir"])
    model.eval()
    # The exact token windows prunequant uses: no re-tokenisation, no shuffling, no padding.
    rows = [{"input_ids": ids[i]} for i in range(ids.shape[0])]
    loader = DataLoader(rows, batch_size=int(job["batch_size"]), shuffle=False)
    recipe = [_modifier(m) for m in job["modifiers"]]

    t0, c0 = time.perf_counter(), time.process_time()
    oneshot(model=model, tokenizer=tok, dataset=loader, recipe=recipe, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False, pipeline=job.get("pipeline", "independent"))
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0

    weights = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.startswith("model.layers."):
            weights[name + ".weight"] = mod.weight.detach().to(torch.float32).contiguous().clone()
    save_file(weights, job["out_weights"])
    record = {"seconds": seconds, "cpu_seconds": cpu_seconds, "threads": torch.get_num_threads(), "n_weights": len(weights),
              "versions": {"llmcompressor": llmcompressor.__version__,
                           "compressed_tensors": compressed_tensors.__version__,
                           "transformers": transformers.__version__, "torch": torch.__version__,
                           "python": sys.version.split()[0]},
              "recipe": [repr(m) for m in recipe]}
    open(job["out_json"], "w").write(json.dumps(record, indent=2))


def layer_check(job: dict) -> None:
    """Theirs on single layers (W, H given): GPTQ with the observer's grid, and SparseGPT (llm-compressor 0.14 API)."""
    import torch
    from compressed_tensors.quantization import QuantizationArgs
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
    from llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify import sparsify_weight
    from llmcompressor.observers import Observer

    torch.set_num_threads(int(job["threads"]))
    layers = torch.load(job["layers"])
    out = {}
    for name, d in layers.items():
        W, H = d["W"], d["H"]
        for bits in job["bits"]:
            qa = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group",
                                  group_size=job["group_size"], actorder=None)
            qp = Observer.load_from_registry("memoryless_minmax", base_name="weight", args=qa)(W).get_qparams()
            q, _, _ = quantize_weight(W[None].clone(), H[None].clone(), qp["scale"][None], qp["zero_point"][None],
                                      None, qa, job["block_size"], job["damp"])
            out[f"{name}|gptq{bits}"] = q[0]
        for tag, (n, m) in (("sgpt50", (0, 0)), ("sgpt24", (2, 4))):
            lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
            lin.weight.data = W.clone()
            res = sparsify_weight(lin, {lin: H.clone()}, 0.5, n, m, job["block_size"], job["damp"], False)
            out[f"{name}|{tag}"] = (res[1] if isinstance(res, tuple) else res).detach()
    torch.save(out, job["out"])


if __name__ == "__main__":
    _job = json.loads(open(sys.argv[1]).read())
    layer_check(_job) if _job.get("mode") == "layers" else main(sys.argv[1])
