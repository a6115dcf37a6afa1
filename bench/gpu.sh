#!/usr/bin/env bash
# The serving benchmarks on a lent GPU machine, in one call: no network there, so what the
# project needs beyond that machine's Python (PyTorch, numpy, ONNX Runtime, ...) travels in .device/.
#
#   bash bench/gpu.sh prepare   # here, with the package registries: fills .device/ (wheels + wrk)
#   bash bench/gpu.sh           # there, from the repo root, with .device/ carried along
#
# There it installs the wheels into /tmp/site (PYTHONPATH, so the machine's own torch, numpy and
# onnxruntime are used), puts the carried wrk on PATH, prints the machine, then runs
#   1. bench/serving.py: the small and wide models, ours against ours-nolog (what the inference log
#      costs), the server pinned to 2 CPUs (the box it is sized for) and wrk to others;
#   2. bench/cuda.py: the wide MLP as a PyTorch exported program served on the GPU, on the CPU
#      (CUDA_VISIBLE_DEVICES=) and as ONNX on the CPU, ratios measured in the same run;
# and writes everything to $OUT (a temp dir when unset): gpu.log, serving.md/json, cuda.md/json and
# server-logs.tar.gz, then prints a markdown summary (summary.md).
#
# Environment (the defaults are the device's): GPU_SH_PYTHON (python3), GPU_SH_SKIP_INSTALL=1 (use
# GPU_SH_PYTHON's own packages), GPU_SH_DURATION (5 s per measurement), GPU_SH_ROUNDS (2 rounds of
# step 1, medians reported), GPU_SH_MODELS (small,wide: step 1's models), GPU_SH_STEPS (1,2: the
# steps to run), GPU_SH_SERVER_CPUS (two CPUs on distinct physical cores, from lscpu: not one core's
# two hyperthreads), GPU_SH_LOAD_CPUS (8 CPUs on the other cores), GPU_SH_WRK_THREADS (4),
# GPU_SH_REQUIRE_CUDA (step 2 fails unless the GPU served; 1 where nvidia-smi is, else 0). CPU
# lists are clamped to the CPUs that exist. A local dry
# run on the CPU:
#   GPU_SH_PYTHON=.venv/bin/python GPU_SH_SKIP_INSTALL=1 GPU_SH_DURATION=1 bash bench/gpu.sh

set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DEVICE=$ROOT/.device

# What the device lacks for `python -m serving`, bench/serving.py and bench/servers/*, at the
# versions constraints.txt pins (import-time needs only: no mlflow server, boto3, alibi, ...).
CARRY=(
    kserve fastapi starlette uvicorn httptools orjson
    pydantic pydantic-core pydantic-settings python-dotenv annotated-types typing-inspection typing-extensions
    cloudevents deprecation grpc-interceptor timing-asgi protobuf
    kubernetes durationpy oauthlib requests-oauthlib websocket-client
    mlflow-skinny databricks-sdk importlib-metadata cachetools sqlparse
    opentelemetry-api opentelemetry-sdk opentelemetry-proto opentelemetry-semantic-conventions
)

prepare() {
    local pip=${GPU_SH_PIP:-.venv/bin/python -m pip} tmp pkg pin
    rm -rf "$DEVICE"
    mkdir -p "$DEVICE/whl" "$DEVICE/wrk/lib" "$DEVICE/bin"
    for pkg in "${CARRY[@]}"; do
        pin=$(grep -iE "^${pkg//[-_]/[-_]}==" constraints.txt) || { echo "gpu.sh: $pkg is not in constraints.txt" >&2; return 1; }
        $pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d "$DEVICE/whl" "$pin" || return 1
    done
    # wrk (Debian's) with the libraries it links besides glibc: LuaJIT, and OpenSSL 3 for a
    # machine that has another; the wrapper puts them first for wrk alone.
    tmp=$(mktemp -d)
    (cd "$tmp" && apt-get download wrk libluajit-5.1-2 libssl3) || return 1
    for deb in "$tmp"/*.deb; do dpkg -x "$deb" "$tmp/root"; done
    cp "$tmp/root/usr/bin/wrk" "$DEVICE/wrk/wrk"
    # plain files (no symlinks: what travels to the device may not keep them)
    cp -L "$tmp"/root/usr/lib/x86_64-linux-gnu/{libluajit-5.1.so.2,libssl.so.3,libcrypto.so.3} "$DEVICE/wrk/lib/"
    rm -rf "$tmp"
    cat >"$DEVICE/bin/wrk" <<'EOF'
#!/bin/sh
here=$(dirname "$(readlink -f "$0")")/../wrk
LD_LIBRARY_PATH="$here/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$here/wrk" "$@"
EOF
    chmod +x "$DEVICE/bin/wrk"
    grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >>.git/info/exclude
    ls "$DEVICE/whl"
    du -sh "$DEVICE"
}

if [ "${1:-}" = prepare ]; then
    prepare
    exit
fi

PY=${GPU_SH_PYTHON:-python3}
DURATION=${GPU_SH_DURATION:-5}
ROUNDS=${GPU_SH_ROUNDS:-2}
MODELS=${GPU_SH_MODELS:-small,wide}
STEPS=${GPU_SH_STEPS:-1,2}

# The servers get the first CPUs of two different physical cores, wrk up to 8 CPUs of the cores
# left (lscpu -p: CPU,CORE lines); 0-1 and 4-11 where lscpu says nothing.
pick_cpus() {
    local cpu core server=() load=() busy=" "
    while IFS=, read -r cpu core; do
        if [ ${#server[@]} -lt 2 ] && [[ $busy != *" $core "* ]]; then
            server+=("$cpu")
            busy+="$core "
        elif [[ $busy != *" $core "* ]] && [ ${#load[@]} -lt 8 ]; then
            load+=("$cpu")
        fi
    done < <(lscpu -p=CPU,CORE 2>/dev/null | grep -v '^#')
    if [ ${#server[@]} -eq 2 ] && [ ${#load[@]} -gt 0 ]; then
        echo "$(IFS=,; echo "${server[*]}") $(IFS=,; echo "${load[*]}")"
    else
        echo "0-1 4-11"
    fi
}
read -r picked_server picked_load < <(pick_cpus)
SERVER_CPUS=${GPU_SH_SERVER_CPUS:-$picked_server}
LOAD_CPUS=${GPU_SH_LOAD_CPUS:-$picked_load}
WRK_THREADS=${GPU_SH_WRK_THREADS:-4}
OUT=${OUT:-$(mktemp -d -t gpu-sh-XXXXXX)}
WORK=$(mktemp -d -t gpu-sh-work-XXXXXX) # models and log stores: too big to bring back in $OUT
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu.log") 2>&1
began=$SECONDS
step() { echo; echo "=== [$((SECONDS - began)) s] $*"; }

step "setup"
if [ "${GPU_SH_SKIP_INSTALL:-0}" != 1 ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$DEVICE"/whl/*.whl \
        || { echo "gpu.sh: the wheels did not install"; exit 1; }
    export PYTHONPATH=/tmp/site:$ROOT
else
    export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
fi
[ -x "$DEVICE/bin/wrk" ] && export PATH=$DEVICE/bin:$PATH
export PYTHONUNBUFFERED=1
echo "OUT=$OUT work=$WORK PYTHONPATH=$PYTHONPATH"
echo "wrk: $(command -v wrk) $(wrk -v 2>&1 | head -1)"

step "machine"
if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "no nvidia-smi"; fi
echo "nproc: $(nproc)"
lscpu 2>/dev/null | grep -E "^(Model name|CPU\(s\)|Thread|Core|Socket|NUMA node)" || true
echo "servers on CPUs $SERVER_CPUS, wrk on $LOAD_CPUS; lscpu -p=CPU,CORE: $(lscpu -p=CPU,CORE 2>/dev/null | grep -v '^#' | tr '\n' ' ')"
"$PY" - <<'EOF'
import sys
print("python", sys.version.split()[0], sys.executable)
for name in ("torch", "numpy", "onnxruntime", "onnx", "kserve", "fastapi", "uvicorn", "pydantic", "mlflow", "pandas", "google.protobuf"):
    try:
        module = __import__(name, fromlist=["__version__"])
        print(f"{name} {getattr(module, '__version__', '?')} ({module.__file__})")
    except Exception as exc:  # report, go on: the step that needs it says more
        print(f"{name}: {exc.__class__.__name__}: {exc}")
try:
    import torch
    print("torch.cuda.is_available():", torch.cuda.is_available(),
          torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
except Exception as exc:
    print("torch:", exc)
EOF

pins=(--server-cpus "$SERVER_CPUS" --load-cpus "$LOAD_CPUS" --wrk-threads "$WRK_THREADS")

serving_rc=skipped
if [[ ,$STEPS, == *,1,* ]]; then
    step "1. inference log cost: bench/serving.py $MODELS x ours,ours-nolog (${DURATION} s each, $ROUNDS rounds)"
    timeout -s INT -k 20 $((ROUNDS * (20 * DURATION + 60) + 90)) \
        "$PY" -m bench.serving --models "$MODELS" --servers ours,ours-nolog --duration "$DURATION" \
        --rounds "$ROUNDS" "${pins[@]}" \
        --work "$WORK/serving" --json "$OUT/serving.json" >"$OUT/serving.md"
    serving_rc=$?
    echo "bench.serving exit $serving_rc"
fi

cuda_rc=skipped
if [[ ,$STEPS, == *,2,* ]]; then
    step "2. CUDA: bench/cuda.py wide MLP, torch-cuda / torch-cpu / onnx-cpu (${DURATION} s each)"
    cuda_flags=()
    require_cuda=0
    command -v nvidia-smi >/dev/null && require_cuda=1
    [ "${GPU_SH_REQUIRE_CUDA:-$require_cuda}" = 1 ] && cuda_flags=(--require-cuda)
    timeout -s INT -k 20 $((12 * DURATION + 150)) \
        "$PY" -m bench.cuda --duration "$DURATION" "${pins[@]}" "${cuda_flags[@]}" \
        --work "$WORK/cuda" --json "$OUT/cuda.json" >"$OUT/cuda.md"
    cuda_rc=$?
    echo "bench.cuda exit $cuda_rc"
fi

# One file for the servers' logs: what comes back from the machine is a few files.
(cd "$WORK" && find . -maxdepth 2 -name '*.log' -print0 | tar --null -czf "$OUT/server-logs.tar.gz" -T -)
rm -rf "$WORK"

step "summary"
{
    echo "## Serving benchmarks on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || echo 'no GPU'), $(nproc) CPUs"
    echo
    echo "Servers pinned to CPUs $SERVER_CPUS, wrk to $LOAD_CPUS (as asked; clamped to the CPUs there), $WRK_THREADS wrk threads,"
    echo "${DURATION} s per measurement;"
    echo "every ratio is to a baseline measured in this run. Total $((SECONDS - began)) s."
    echo
    echo "### 1. What the inference log costs (bench/serving.py, exit $serving_rc)"
    [ -f "$OUT/serving.md" ] && cat "$OUT/serving.md"
    echo
    echo "### 2. PyTorch on CUDA against the CPU (bench/cuda.py, exit $cuda_rc)"
    [ -f "$OUT/cuda.md" ] && cat "$OUT/cuda.md"
} | tee "$OUT/summary.md"
[[ $serving_rc == @(0|skipped) ]] && [[ $cuda_rc == @(0|skipped) ]]
