#!/usr/bin/env bash
# The whole interop suite: install every model server it knows (each in a venv of its
# own under .venv-interop/, llama-cpp-python included, which compiles llama.cpp for about
# 5 minutes on 2 cores the first time), run tests/interop/ against all of them, then
# measure the latency flipback adds in front of each (and TTFT for the LLM server).
#
#   bash loadtests/interop.sh                 # install all, test all, measure all
#   bash loadtests/interop.sh mlflow llama    # a subset
#   INTEROP_NO_LATENCY=1 bash loadtests/interop.sh   # tests only
#
# Run from anywhere; it uses the project's .venv (made by .ci/run or by hand). All traffic
# is on 127.0.0.1; every server it starts is stopped by PID when its tests end.
set -euo pipefail
cd "$(dirname "$0")/.."

[ -f .venv/bin/activate ] || { echo "no .venv: run .ci/run or make it first" >&2; exit 2; }
. .venv/bin/activate

servers=("$@")
[ "${#servers[@]}" -gt 0 ] || servers=(mlflow mlserver llama)

echo "== install: ${servers[*]}"
bash tests/interop/setup_venvs.sh "${servers[@]}"

files=(tests/interop/test_canary_dies_after_head.py)
for s in "${servers[@]}"; do files+=("tests/interop/test_${s}.py"); done
echo "== tests: ${files[*]}"
python -m pytest -q -rsx "${files[@]}"

if [ -z "${INTEROP_NO_LATENCY:-}" ]; then
  echo "== added latency (200 sequential requests each way, 100 streams for TTFT)"
  only=$(IFS=,; echo "${servers[*]}")
  python -m tests.interop.latency --only "$only"
fi
