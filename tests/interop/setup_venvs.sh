#!/usr/bin/env bash
# Install model servers for the interop suite, each in a virtualenv of its own, so that
# none of their dependencies touch the project's .venv (aiohttp, orjson, uvloop pins).
#
#   bash tests/interop/setup_venvs.sh mlflow mlserver llama   # or any subset; no args: all
#
# Venvs go to $FLIPBACK_INTEROP_VENVS (default .venv-interop/ in the repository), one per
# server; a stamp file records what was installed, so a second run with the same pins
# installs nothing. Measured on the project's 2-core machine, cold pip cache:
# mlflow 45 s, mlserver 34 s, llama 5 min 20 s (llama-cpp-python compiles llama.cpp).
set -euo pipefail
cd "$(dirname "$0")/../.."

VENVS="${FLIPBACK_INTEROP_VENVS:-$PWD/.venv-interop}"
PYTHON="${PYTHON:-python3}"

packages() {
  case "$1" in
    mlflow)   echo "mlflow==3.17.2 scikit-learn==1.9.1" ;;
    mlserver) echo "mlserver==1.7.1 mlserver-sklearn==1.7.1" ;;
    llama)    echo "llama-cpp-python[server]==0.3.36 gguf==0.19.0 openai==3.63.0" ;;
    *) echo "unknown interop server: $1 (mlflow, mlserver, llama)" >&2; return 2 ;;
  esac
}

[ "$#" -gt 0 ] || set -- mlflow mlserver llama
status=0
for name in "$@"; do
  spec="$(packages "$name")"
  dir="$VENVS/$name"
  if [ -f "$dir/.flipback-installed" ] && [ "$(cat "$dir/.flipback-installed")" = "$spec" ]; then
    echo "interop: $name already installed in $dir"
    continue
  fi
  start=$SECONDS
  rm -f "$dir/.flipback-installed"
  "$PYTHON" -m venv "$dir"
  # shellcheck disable=SC2086  # the spec is a list of requirements
  if "$dir/bin/python" -m pip install -q --disable-pip-version-check $spec \
      >"$dir/install.log" 2>&1; then
    echo "$spec" >"$dir/.flipback-installed"
    echo "interop: $name installed in $((SECONDS - start)) s ($spec)"
  else
    echo "interop: $name failed to install after $((SECONDS - start)) s; see $dir/install.log" >&2
    status=1
  fi
done
exit $status
