#!/usr/bin/env bash
# The prepared GPU check of issue 14: the CUDA tests (tests/benchmarks/test_cuda.py, marker gpu) and the GPU
# benchmarks (`python -m benchmarks.gpu_check`, benchmarks/gpu_check/), JSON + Markdown + logs written to
# $OUT. Sized to finish within 8 minutes on a lent H100 or H200 (GPU_CHECK_TOTAL_S, default 450 s, bounds it).
#
# 1. Preparation, once, on a machine that reaches PyPI, in the repository root. The GPU machine
#    has torch but not diffusers, FastAPI, ... and no network: they travel as wheels (~12 MB) in
#    build/gpu-wheels/ (ignored through .gitignore's build/):
#        bash benchmarks/gpu_check.sh --download
#    which runs exactly (versions from constraints.txt where it pins them; Python 3.12, x86-64):
#        python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#            --platform manylinux_2_28_x86_64 --platform manylinux_2_26_x86_64 --platform manylinux_2_17_x86_64 \
#            --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d build/gpu-wheels $(the WHEELS below, pinned)
# 2. On the GPU machine (the device tool's run: carry ["build/gpu-wheels"], timeout_s 540):
#        bash benchmarks/gpu_check.sh
#    It makes a virtualenv with --system-site-packages (reusing the machine's torch; a .pth file
#    reaches it when python3 is itself a virtualenv), installs the wheels with
#    `pip install --no-index --find-links build/gpu-wheels` and the project (editable, no deps),
#    runs `pytest -m gpu tests/benchmarks/test_cuda.py`, then `python -m benchmarks.gpu_check` with the time
#    that is left. Files in $OUT: setup.log, cuda_tests.log, gpu_check.log, gpu_check.json,
#    gpu_check.md, servers.log. Copy gpu_check.json to benchmarks/results/gpu/ and run
#    `python -m benchmarks.report` to put it into benchmarks/RESULTS.md.
# 3. CI and any CPU machine, in the project's own environment (no venv, no wheels):
#        bash benchmarks/gpu_check.sh --quick
#    The same steps: the CUDA tests skip, benchmarks.gpu_check runs its --quick CPU mode.
#
# Environment: OUT (default out/gpu_check), GPU_WHEELS (default build/gpu-wheels), GPU_CHECK_VENV
# (default /tmp/vae-gpu-venv), PYTHON (default python3), GPU_CHECK_TOTAL_S (450),
# GPU_CHECK_TESTS_S (the CUDA tests' limit, 200), GPU_CHECK_ARGS (more benchmarks.gpu_check arguments).
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=(diffusers fastapi starlette pydantic pydantic-core pydantic-settings python-dotenv annotated-types
        typing-inspection typing-extensions anyio annotated-doc uvicorn httptools h11 click python-multipart
        importlib-metadata lazy-importer zipp opentelemetry-api litserve pyzmq websockets watchfiles setuptools)
WHEEL_DIR=${GPU_WHEELS:-build/gpu-wheels}
PYBASE=${PYTHON:-python3}
TOTAL=${GPU_CHECK_TOTAL_S:-450}
TESTS_S=${GPU_CHECK_TESTS_S:-200}
mode=full
case "${1:-}" in
  --quick) mode=quick ;;
  --download) mode=download ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [--quick | --download]" >&2; exit 2 ;;
esac

pin() {  # NAME -> NAME==VERSION from constraints.txt (names compared case- and -/_-insensitively)
  local want line name
  want=$(echo "$1" | tr 'A-Z_' 'a-z-')
  while IFS= read -r line; do
    name=$(echo "${line%%==*}" | tr 'A-Z_' 'a-z-')
    if [ "$name" = "$want" ]; then echo "$line"; return; fi
  done < <(grep -E '^[A-Za-z0-9_.-]+==' constraints.txt)
  echo "$1"
}

if [ "$mode" = download ]; then
  specs=()
  for w in "${WHEELS[@]}"; do specs+=("$(pin "$w")"); done
  mkdir -p "$WHEEL_DIR"
  set -x
  "$PYBASE" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_26_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHEEL_DIR" "${specs[@]}"
  { set +x; } 2>/dev/null
  du -sh "$WHEEL_DIR"
  exit 0
fi

start=$SECONDS
if [ "$mode" = quick ]; then
  OUT=${OUT:-out/gpu_check-quick}
else
  OUT=${OUT:-out/gpu_check}
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1

if [ "$mode" = full ]; then
  VENV=${GPU_CHECK_VENV:-/tmp/vae-gpu-venv}
  {
    echo "== setup $(date -u +%FT%TZ): $PYBASE = $(command -v "$PYBASE"), venv $VENV, wheels $WHEEL_DIR"
    ls "$WHEEL_DIR"/*.whl >/dev/null 2>&1 || { echo "no wheels in $WHEEL_DIR: run 'bash benchmarks/gpu_check.sh --download' first and carry it"; exit 3; }
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu --format=csv || true
    "$PYBASE" -m venv --system-site-packages "$VENV" || "$PYBASE" -m venv --system-site-packages --without-pip "$VENV" || exit 3
    PY="$VENV/bin/python"
    if ! "$PY" -c "import torch" 2>/dev/null; then
      # python3 is itself a virtualenv: --system-site-packages reached its base, not its packages.
      site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
      "$PYBASE" -c 'import site, sys; print("\n".join(site.getsitepackages()))' > "$site/gpu-check-base.pth"
      echo "added $site/gpu-check-base.pth:"; cat "$site/gpu-check-base.pth"
    fi
    if "$PY" -m pip --version >/dev/null 2>&1; then PIP=("$PY" -m pip); else PIP=("$PYBASE" -m pip --python "$PY"); fi
    "${PIP[@]}" install -q --disable-pip-version-check --no-index --find-links "$WHEEL_DIR" "${WHEELS[@]}" || {
      echo "resolving against the machine's packages failed: installing the wheels alone (--no-deps)"
      "${PIP[@]}" install -q --disable-pip-version-check --no-index --no-deps --find-links "$WHEEL_DIR" "$WHEEL_DIR"/*.whl || exit 3
    }
    "${PIP[@]}" install -q --disable-pip-version-check --no-index --no-deps --find-links "$WHEEL_DIR" -e . || exit 3
    "$PY" -c "import torch, diffusers, fastapi, uvicorn, pydantic_settings, prometheus_client, PIL, numpy; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(0)); \
print('diffusers', diffusers.__version__, 'fastapi', fastapi.__version__)" || exit 3
    "$VENV/bin/vae" --help >/dev/null || exit 3
    echo "== setup done in $((SECONDS - start)) s"
  } 2>&1 | tee "$OUT/setup.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "gpu_check: setup failed (see $OUT/setup.log)"; exit 3; }
  PY="$VENV/bin/python"
  QUICK=()
else
  PY=$PYBASE
  QUICK=(--quick)
  TESTS_S=120
  TOTAL=${GPU_CHECK_TOTAL_S:-240}
fi

echo "== CUDA tests (limit ${TESTS_S} s)"
timeout -k 10 "$TESTS_S" "$PY" -m pytest -v -rA -m gpu -p no:cacheprovider tests/benchmarks/test_cuda.py 2>&1 | tee "$OUT/cuda_tests.log"
tests_rc=${PIPESTATUS[0]}
[ "$tests_rc" -eq 5 ] && tests_rc=0  # nothing selected is not a failure here
echo "== CUDA tests exit $tests_rc after $((SECONDS - start)) s"

left=$((TOTAL - (SECONDS - start) - 15))
[ "$left" -lt 60 ] && left=60
echo "== benchmarks (budget ${left} s)"
# shellcheck disable=SC2086
timeout -k 5 $((left + 20)) "$PY" -m benchmarks.gpu_check "${QUICK[@]}" --out "$OUT" --budget-s "$left" \
  --tests-log "$OUT/cuda_tests.log" ${GPU_CHECK_ARGS:-} 2>&1 | tee "$OUT/gpu_check.log"
bench_rc=${PIPESTATUS[0]}
echo "== done in $((SECONDS - start)) s: tests exit $tests_rc, benchmarks exit $bench_rc; files in $OUT:"
ls -la "$OUT"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
