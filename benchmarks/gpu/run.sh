#!/usr/bin/env bash
# Strata on one CUDA GPU, in one command: the `gpu` tests, training throughput and MFU for NeoX's
# 125M / 350M / 1.3B shapes, and KV-cached decoding against transformers.generate.
#
#   bash benchmarks/gpu/run.sh prepare   # on a machine with network access (no GPU needed):
#                                        # wheels the GPU image lacks -> .whl/, tokenizer files
#                                        # from $STRATA_ASSETS -> .gpu_assets/ (both git-ignored)
#   bash benchmarks/gpu/run.sh           # on the GPU machine (offline): install .whl/, run all
#
# The GPU side needs only a Python with torch (CUDA), transformers and pytest; what it lacks
# (DeepSpeed and its pure-Python needs) comes from .whl/. Results go to $OUT (default
# benchmarks/results/gpu-latest): env.txt, pytest.log, train_throughput.json, generate.json.
# Knobs: PARTS ("tests train generate"), SIZES ("1-3B 125M 350M": the MFU target first),
# TRAIN_BUDGET_S (seconds after which no new throughput work starts), PYTHON.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-python3}"
WHEELS=.whl
ASSETS=.gpu_assets
# The GPU image's Python (the lent H100/H200 machines run CPython 3.12 on x86-64).
TARGET_PYTHON="${TARGET_PYTHON:-3.12}"
# Wheels the device image lacks: DeepSpeed (source-only on PyPI: built here, without its
# CUDA ops, which JIT-compile when used) and what it and Strata need that the image lacks.
NEEDS="hjson pydantic pydantic-core annotated-types typing-inspection zstandard"
CARRY_LIMIT_MIB=64

prepare() {
  set -e
  local venv_py=.venv/bin/python
  [[ -x $venv_py ]] || { echo "error: run ./setup_uv_env.sh first (.venv is missing)" >&2; exit 1; }
  : "${STRATA_ASSETS:?set STRATA_ASSETS to the assets folder (tokenizers are copied from it)}"
  rm -rf "$WHEELS" "$ASSETS"
  mkdir -p "$WHEELS" "$ASSETS/tokenizers"
  # The versions this project runs with here, for the device's Python and platform.
  local pins=()
  for name in $NEEDS; do
    pins+=("$name==$("$venv_py" -c "from importlib.metadata import version; print(version('$name'))")")
  done
  "$venv_py" -m pip download -q --no-deps --only-binary=:all: --python-version "$TARGET_PYTHON" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$WHEELS" "${pins[@]}"
  local ds_version
  ds_version=$("$venv_py" -c "from importlib.metadata import version; print(version('deepspeed'))")
  DS_BUILD_OPS=0 "$venv_py" -m pip wheel -q --no-deps --no-build-isolation -w "$WHEELS" \
    "deepspeed==$ds_version"
  cp "$STRATA_ASSETS"/tokenizers/{gpt2-vocab.json,gpt2-merges.txt,gpt-neox-20b-pii-special.json} \
    "$ASSETS/tokenizers/"
  ls -l "$WHEELS" "$ASSETS/tokenizers"
  # What travels: tracked and untracked-not-ignored files, plus the two carried folders.
  local tree carried
  tree=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- | tail -n 1 | cut -f 1)
  carried=$(du -cb "$WHEELS" "$ASSETS" | tail -n 1 | cut -f 1)
  local total_mib=$(((tree + carried) / 1048576))
  echo "travels: working tree $((tree / 1024)) KiB + carried $((carried / 1024)) KiB = ${total_mib} MiB (limit ${CARRY_LIMIT_MIB} MiB)"
  if ((total_mib >= CARRY_LIMIT_MIB)); then
    echo "error: over the ${CARRY_LIMIT_MIB} MiB a device call carries" >&2
    exit 1
  fi
}

run_on_gpu() {
  local out="${OUT:-benchmarks/results/gpu-latest}"
  local parts="${PARTS:-tests train generate}"
  mkdir -p "$out"
  # Into the image's own environment (the machine is thrown away afterwards), so every process
  # the launcher starts finds them whatever its PYTHONPATH.
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "$WHEELS"/*.whl \
    || { echo "error: installing $WHEELS failed" >&2; exit 1; }
  export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
  export DS_ACCELERATOR=cuda STRATA_ASSETS="$PWD/$ASSETS"
  {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    "$PY" -c "import torch, deepspeed, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__)"
  } 2>&1 | tee "$out/env.txt"
  local status=0
  if [[ " $parts " == *" tests "* ]]; then
    timeout 420 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py 2>&1 \
      | tee "$out/pytest.log" | tail -n 40
    ((PIPESTATUS[0] == 0)) || status=1
  fi
  if [[ " $parts " == *" train "* ]]; then
    # shellcheck disable=SC2086
    timeout 480 "$PY" benchmarks/gpu/train_throughput.py --sizes ${SIZES:-1-3B 125M 350M} \
      --budget-s "${TRAIN_BUDGET_S:-200}" --output "$out/train_throughput.json" >/dev/null \
      2> >(tee "$out/train_throughput.log" | grep -E '^[0-9]|error|Error' >&2) || status=1
    "$PY" benchmarks/gpu/summary.py "$out/train_throughput.json" || status=1
  fi
  if [[ " $parts " == *" generate "* ]]; then
    timeout 240 "$PY" benchmarks/generate.py --random-shape pythia-410m --device cuda \
      --dtype bf16 --batch-sizes 1 16 --new-tokens 128 --repeats 3 \
      >"$out/generate.json" 2>"$out/generate.log" || status=1
    cat "$out/generate.json"
  fi
  return $status
}

case "${1:-run}" in
  prepare) prepare ;;
  run) run_on_gpu ;;
  *) echo "usage: $0 [prepare|run]" >&2; exit 2 ;;
esac
