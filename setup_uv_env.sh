#!/usr/bin/env bash
# One idempotent command that makes .venv with everything Strata needs.
#   CUDA machine -> CUDA build of torch, GPU extras tried (never fatal)
#   otherwise    -> CPU build of torch, no CUDA package downloaded
# Usage: ./setup_uv_env.sh [--extras dev,hf,logging]   (default extras: dev,hf,logging,eval)
set -euo pipefail
cd "$(dirname "$0")"

TORCH_VERSION="${STRATA_TORCH_VERSION:-2.13.0}"
EXTRAS="dev,hf,logging,eval"
[[ "${1:-}" == "--extras" ]] && EXTRAS="$2"
PY="${PYTHON:-python3}"

if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip uv
UV=(.venv/bin/uv pip install --python "$VPY")
# uv ignores pip's configuration: pass on local wheel folders and extra indexes.
for link in ${PIP_FIND_LINKS:-}; do UV+=(--find-links "$link"); done
for index in ${PIP_EXTRA_INDEX_URL:-}; do UV+=(--extra-index-url "$index"); done

has_cuda() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

# A constraints file keeps later installs (deepspeed, extras) from replacing the torch chosen here.
CONSTRAINTS=.venv/strata-constraints.txt
if ! "$VPY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '${TORCH_VERSION}')" 2>/dev/null; then
  if has_cuda; then
    "${UV[@]}" "torch==${TORCH_VERSION}"
  else
    # A CPU wheel in a local wheel folder (pip's find-links) wins; otherwise PyTorch's CPU index,
    # which has no CUDA packages.
    local_wheel=$(for d in ${PIP_FIND_LINKS:-}; do ls "$d"/torch-"${TORCH_VERSION}"*cpu*.whl 2>/dev/null; done | head -n 1)
    if [[ -n "$local_wheel" ]]; then
      "${UV[@]}" "$local_wheel"
    else
      "${UV[@]}" "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu \
        --extra-index-url https://pypi.org/simple
    fi
  fi
fi
"$VPY" -c "import torch; print(f'torch=={torch.__version__}')" > "$CONSTRAINTS"

"${UV[@]}" -c "$CONSTRAINTS" -e ".[${EXTRAS}]"

if has_cuda; then
  echo "CUDA found: trying the optional GPU extras (flash-attn, transformer-engine)"
  "${UV[@]}" -c "$CONSTRAINTS" --no-build-isolation "flash-attn>=2.6" \
    || echo "warning: flash-attn did not install; attention falls back to SDPA"
  "${UV[@]}" -c "$CONSTRAINTS" "transformer-engine[pytorch]>=1.10" \
    || echo "warning: transformer-engine did not install"
fi

# Bytecode ahead of time: where PYTHONDONTWRITEBYTECODE is set, every launched process would
# otherwise recompile torch's and DeepSpeed's sources (measured: a one-process CPU launch took
# 17 s instead of 7 s). A few third-party files target newer Pythons and do not compile: ignored.
"$VPY" -m compileall -q -j 0 "$("$VPY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" \
  >/dev/null || true

"$VPY" -m megatron.doctor
