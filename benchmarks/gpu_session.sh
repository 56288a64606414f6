#!/usr/bin/env bash
# One GPU-machine session: GPU tests, then the GPU bench variants (idle and under matmul load).
# Usage on the GPU machine, from the repository root, with the wheels from
# ../shared/gpu/fetch-wheels.sh plus `pip wheel --no-deps . -w .whl` carried in .whl/:
#   OUT=/some/dir bash benchmarks/gpu_session.sh [tests|bench|all|final|staged|trace|one|quick|debug]
set -uo pipefail
what=${1:-all}
OUT=${OUT:-/tmp/lmcd-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site
# run from a copy without the source folders, so that the installed lmcd is the one imported
cp benchmarks/gpu_trace.py /tmp/lmcd-trace.py; cp benchmarks/gpu_probe.py /tmp/lmcd-probe.py; cp benchmarks/request_path.py /tmp/lmcd-request-path.py
RUN=/tmp/lmcd-run; rm -rf $RUN; mkdir -p $RUN; cp -r tests pyproject.toml $RUN/; cd $RUN
nvidia-smi --query-gpu=name,pci.bus_id,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c 'import torch, cupy; print("torch", torch.__version__, "cupy", cupy.__version__, "gpus", torch.cuda.device_count())'
grep -n "cuMemcpyBatchAsync" /usr/local/cuda/include/cuda.h 2>/dev/null | head -5

if [[ $what == tests || $what == all || $what == quick || $what == final ]]; then
  timeout 420 python3 -m pytest -p no:cacheprovider -m gpu tests/gpu/test_kernels_gpu.py tests/gpu/test_cuda_worker_gpu.py -q -W ignore::UserWarning \
    -o addopts="" --timeout 200 2>&1 | tee "$OUT/gpu-tests.log" | tail -40
fi

bench() {  # bench NAME SERVER-FLAGS... -- BENCH-FLAGS...
  local name=$1; shift
  local sflags=() bflags=()
  while [[ $# -gt 0 && $1 != -- ]]; do sflags+=("$1"); shift; done
  shift || true
  bflags=("$@")
  local port=$((5600 + RANDOM % 300))
  python3 -m lmcd server --host 127.0.0.1 --port $port --http-port 0 --l1-size-gb 12 --cuda on "${sflags[@]}" \
    > "$OUT/server-$name.log" 2>&1 &
  local spid=$!
  for _ in $(seq 1 120); do grep -q "cache server is running" "$OUT/server-$name.log" && break; sleep 0.5; done
  echo "=== $name: server ${sflags[*]}; bench ${bflags[*]}"
  timeout 240 python3 -m lmcd bench --device cuda --host 127.0.0.1 --port $port --json "${bflags[@]}" \
    2>&1 | tee "$OUT/bench-$name.log" | grep -v '^{' | grep -v "LMCache INFO"
  kill -TERM $spid; wait $spid
  grep -E "Pinning|pinned|GPU workers" "$OUT/server-$name.log" | head -3
}

if [[ $what == one ]]; then
  bench kernel16 --copy-ctas 16 -- --repeats 20 --load
fi
if [[ $what == debug ]]; then
  bench debug --log-level DEBUG -- --repeats 10 --tokens 256,4096
  grep -E "launched|Replied to (store|retrieve)|submit us" "$OUT/server-debug.log" | tail -12
fi
if [[ $what == quick ]]; then
  bench kernel16 --copy-ctas 16 -- --repeats 10 --load --in-process --in-process-ctas 16
fi
if [[ $what == bench || $what == all ]]; then
  bench kernel16 --copy-ctas 16 -- --repeats 20 --load --in-process --in-process-ctas 16
  bench kernel132 --copy-ctas 132 -- --repeats 10 --tokens 4096,16384 --load --in-process --in-process-ctas 132
  bench kernel8 --copy-ctas 8 -- --repeats 10 --tokens 256,4096,16384 --load
  bench dma --copy-engine dma -- --repeats 20 --load
fi
if [[ $what == trace ]]; then
  timeout 400 python3 /tmp/lmcd-trace.py --tokens ${TRACE_TOKENS:-256,4096,16384} --repeats 20 2>&1 | grep -v "LMCache INFO" | tee "$OUT/trace.log"
fi
if [[ $what == final ]]; then
  bench kernel16 --copy-ctas 16 -- --repeats 20 --load
  bench dma --copy-engine dma -- --repeats 20 --load
fi
if [[ $what == staged ]]; then
  timeout 150 python3 /tmp/lmcd-probe.py staged 2>&1 | tee "$OUT/probe-staged.log"
  bench staged --copy-engine staged -- --repeats 20 --load
  bench kernel16 --copy-ctas 16 -- --repeats 20
fi
if [[ $what == timeline || $what == timeline+tests ]]; then
  timeout 200 python3 /tmp/lmcd-trace.py --timeline --tokens ${TRACE_TOKENS:-256,4096} --repeats 30 ${TRACE_FLAGS:-} 2>&1 \
    | grep -v "LMCache INFO" | tee "$OUT/timeline.log"
fi
if [[ $what == timeline+tests ]]; then
  timeout 420 python3 -m pytest -p no:cacheprovider -m gpu tests/gpu/test_kernels_gpu.py tests/gpu/test_cuda_worker_gpu.py -q -W ignore::UserWarning \
    -o addopts="" --timeout 200 2>&1 | tee "$OUT/gpu-tests.log" | tail -40
fi
if [[ $what == staged2 ]]; then
  timeout 200 python3 -m pytest -p no:cacheprovider -m gpu tests/gpu/test_kernels_gpu.py tests/gpu/test_cuda_worker_gpu.py -q -W ignore::UserWarning \
    -o addopts="" --timeout 100 2>&1 | tee "$OUT/gpu-tests.log" | tail -15
  timeout 100 python3 /tmp/lmcd-probe.py staged 2>&1 | tee "$OUT/probe-staged.log"
  bench staged16 --copy-engine staged -- --repeats 20 --load
  LMCD_STAGE_BUFFERS=4 bench staged16x4 --copy-engine staged -- --repeats 20 --load --tokens 4096,16384
  bench staged132 --copy-engine staged --copy-ctas 132 -- --repeats 20 --load
  timeout 100 python3 /tmp/lmcd-trace.py --timeline --tokens 256 --repeats 30 --copy-engine staged 2>&1 \
    | grep -v "LMCache INFO" | tee "$OUT/timeline.log"
fi
if [[ $what == staged3 ]]; then
  timeout 200 python3 -m pytest -p no:cacheprovider -m gpu tests/gpu/test_kernels_gpu.py tests/gpu/test_cuda_worker_gpu.py -q -W ignore::UserWarning \
    -o addopts="" --timeout 100 2>&1 | tee "$OUT/gpu-tests.log" | tail -15
  timeout 100 python3 /tmp/lmcd-probe.py staged 2>&1 | tee "$OUT/probe-staged.log"
  bench staged --copy-engine staged -- --repeats 20 --load
  LMCD_STAGE_BUFFERS=2 bench staged-x2 --copy-engine staged -- --repeats 20 --load --tokens 4096,16384
  LMCD_STAGE_BUFFERS=8 bench staged-x8 --copy-engine staged -- --repeats 20 --load --tokens 4096,16384
  bench dma --copy-engine dma -- --repeats 10 --load --tokens 16384
fi
if [[ $what == engines ]]; then
  timeout 200 python3 -m pytest -p no:cacheprovider -m gpu tests/gpu/test_kernels_gpu.py tests/gpu/test_cuda_worker_gpu.py -q -W ignore::UserWarning \
    -o addopts="" --timeout 100 2>&1 | tee "$OUT/gpu-tests.log" | tail -15
  bench staged --copy-engine staged -- --repeats 20 --load
  bench dma --copy-engine dma -- --repeats 20 --load
  bench kernel --copy-engine kernel -- --repeats 20 --load
  timeout 100 python3 /tmp/lmcd-trace.py --timeline --tokens 256,4096 --repeats 30 2>&1 \
    | grep -v "LMCache INFO" | tee "$OUT/timeline.log"
fi
if [[ $what == latency ]]; then
  timeout 100 python3 /tmp/lmcd-trace.py --timeline --tokens 256,4096 --repeats 30 2>&1 | grep -v "LMCache INFO" | tee "$OUT/timeline.log"
  timeout 120 python3 /tmp/lmcd-request-path.py --requests 2000 2>&1 | tail -30 | tee "$OUT/request-path.log"
  bench staged --copy-engine staged -- --repeats 30
fi
if [[ $what == check ]]; then
  timeout 100 python3 /tmp/lmcd-trace.py --timeline --tokens 256,4096 --repeats 30 2>&1 | grep -v "LMCache INFO" | tee "$OUT/timeline.log"
  bench staged --copy-engine staged -- --repeats 30 --load
  timeout 200 python3 -m pytest -p no:cacheprovider -m gpu tests/gpu/test_kernels_gpu.py tests/gpu/test_cuda_worker_gpu.py -q -W ignore::UserWarning \
    -o addopts="" --timeout 100 2>&1 | tee "$OUT/gpu-tests.log" | tail -5
fi
if [[ $what == diag ]]; then
  timeout 120 python3 /tmp/lmcd-probe.py pool 2>&1 | tee "$OUT/probe-pool.log"
  LMCD_TRACE_SPIN=1 timeout 100 python3 /tmp/lmcd-trace.py --timeline --tokens 256 --repeats 30 2>&1 | grep -v "LMCache INFO" | tee "$OUT/timeline-spin.log"
fi
if [[ $what == probe ]]; then
  timeout 150 python3 /tmp/lmcd-probe.py staged 2>&1 | tee "$OUT/probe-staged.log"
fi
if [[ $what == cpuwait ]]; then
  timeout 100 python3 /tmp/lmcd-trace.py --timeline --tokens 256,4096 --repeats 30 2>&1 | grep -v "LMCache INFO" | grep -E "tokens|^ +[0-9]|Store|Retrieve|whole|GPU:" | tee "$OUT/timeline.log"
  LMCD_TRACE_CPU_WAIT=1 timeout 100 python3 /tmp/lmcd-trace.py --timeline --tokens 256,4096 --repeats 30 2>&1 | grep -v "LMCache INFO" | grep -E "tokens|^ +[0-9]|Store|Retrieve|whole|GPU:" | tee "$OUT/timeline-cpuwait.log"
fi
