#!/bin/bash
# One device call: kernel check, then the scale benchmarks and the peer comparison (issue 9).
# Usage on the GPU machine, from the repo root: bash benchmarks/gpu_session.sh STEP...
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
O=${OUT:-/tmp/out}; mkdir -p $O
R=$O/results.jsonl
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
for step in "$@"; do
  echo "=== $step $(date +%T)"
  case $step in
    check) timeout 120 python benchmarks/check_triton_gpu.py || { echo "triton kernel check FAILED: torch loop from here"; export PRUNEQUANT_NO_TRITON=1; } ;;
    1b) timeout 240 python benchmarks/gpu_scale.py --shape 1b --out $R ;;
    7b-gptq) timeout 240 python benchmarks/gpu_scale.py --shape 7b --methods gptq --out $R ;;
    7b-other) timeout 150 python benchmarks/gpu_scale.py --shape 7b --methods sparsegpt,joint --blocks 4 --out $R ;;
    13b) timeout 120 python benchmarks/gpu_scale.py --shape 13b --methods gptq --blocks 4 --out $R ;;
    70b) timeout 200 python benchmarks/gpu_scale.py --shape 70b --methods gptq,sparsegpt --blocks 1 --out $R ;;
    peer) timeout 400 python benchmarks/peer_gpu.py --shape 7b --blocks ${PEER_BLOCKS:-4} --out $O/peer.jsonl ;;
  esac
done
echo "=== done $(date +%T)"
