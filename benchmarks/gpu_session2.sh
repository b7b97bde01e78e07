#!/bin/bash
# Second-session device calls (SmolLM2 quality rows, peers, search, speed). Usage on the GPU machine, from the
# repo root: source benchmarks/device_setup.sh; bash benchmarks/gpu_session2.sh STEP...
# Results go to /tmp/pq/results (kept while the machine stays warm) and are copied to $OUT after every step.
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
O=${OUT:-/tmp/out}; R=/tmp/pq/results; mkdir -p $O $R
for step in "$@"; do
  echo "=== $step $(date +%T)"
  case $step in
    peer7b) PYTHONPATH=$PYTHONPATH:/tmp/pq/peer timeout 300 python benchmarks/peer_gpu.py --shape 7b --blocks 4 --out $R/peer_gpu.jsonl ;;
    q-found) timeout 200 python benchmarks/quality_suite.py --group foundation --calib-samples 128 --max-tokens 40000 --out $R/quality_gpu ;;
    q-prune) timeout 400 python benchmarks/quality_suite.py --group prune --calib-samples 128 --max-tokens 40000 --out $R/quality_gpu ;;
    q-quant) timeout 400 python benchmarks/quality_suite.py --group quant --calib-samples 128 --max-tokens 40000 --out $R/quality_gpu ;;
    q-joint) timeout 400 python benchmarks/quality_suite.py --group joint --calib-samples 128 --max-tokens 40000 --out $R/quality_gpu ;;
    notriton) PRUNEQUANT_NO_TRITON=1 timeout 200 python benchmarks/quality_suite.py --group foundation,quant,joint --only baseline gptq3_g128 gptq4_g128 t0.875_s50_q4 --calib-samples 128 --max-tokens 40000 --out $R/quality_gpu_notriton ;;
    q-mixed) timeout 300 python benchmarks/quality_suite.py --group foundation,quant,joint --only baseline gptq3_g128 mixed2.5_g128 mixed3_g128 t0.875_s25_mixed2.67 --calib-samples 128 --max-tokens 40000 --out $R/quality_gpu_fisher ;;
    jvq) timeout 400 python benchmarks/joint_vs_quant.py run --device cuda --results $R/joint_vs_quant --budget 330 ${JVQ_ONLY:+--only $JVQ_ONLY} ;;
    search) timeout 420 python benchmarks/search_smollm2.py --device cuda --n-trials ${TRIALS:-24} --calib 128 --seq-len 512 --eval-tokens 40000 --results $R/search ;;
    speed1b) timeout 480 python benchmarks/structural_speed.py --shape 1b --out $R/structural_speed_1b.jsonl ;;
    speedsmol) timeout 480 python benchmarks/structural_speed.py --model smollm2-135m --ids benchmarks/results/structural_speed/smollm2_ids.pt --out $R/structural_speed_smol.jsonl ;;
  esac
  cp -r $R/. $O/
done
echo "=== done $(date +%T)"
