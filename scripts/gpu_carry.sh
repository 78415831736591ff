#!/usr/bin/env bash
# Build what scripts/bench_gpu.sh needs on the GPU machine beside .carry/ (tritonserver), all under workspace/
# (git-ignored, so it travels only when carried):
#   workspace/gpu_py/    cp312 wheels the image lacks: pyzmq (engine IPC), python-rapidjson, protobuf<5, grpcio
#                        (tritonclient.grpc), msgpack; plus a copy of the tritonclient package directory
#   workspace/gpu_perf/  perf_analyzer (stripped, xz); libs.tar.xz: libb64.so.0d (Debian libb64-0d) and
#                        libcudart.so.12 (PyPI nvidia-cuda-runtime-cu12; the image's CUDA 13 has only .so.13);
#                        ssl.tar.xz: this machine's OpenSSL 3 (a fallback); bench_tok.tar.xz: the demo tokenizer
# Usage, project root, after `make install`:  bash scripts/gpu_carry.sh [.venv]   (WHEELS=0: gpu_perf/ only)
# Then measure what travels:  bash scripts/gpu_carry.sh --size
set -euo pipefail
carried=(.carry workspace/gpu_py workspace/gpu_perf)
if [ "${1:-}" = "--size" ]; then   # everything a device call sends: tracked + untracked-not-ignored + carried
  tree=$({ git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 du -cb 2>/dev/null \
         | tail -1 | cut -f1)
  carry=$(du -sbc "${carried[@]}" | tail -1 | cut -f1)
  echo "tree $tree + carried $carry = $((tree + carry)) bytes; the limit is 67108864 (64 MiB)"
  exit 0
fi
venv=${1:-.venv}
site=$("$venv/bin/python" -c 'import site; print(site.getsitepackages()[0])')
dl() { "$venv/bin/python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_26_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d workspace/gpu_py "$@"; }
mkdir -p workspace/gpu_py workspace/gpu_perf
if [ "${WHEELS:-1}" = 1 ]; then   # WHEELS=0 (make bench-gpu): the venv has these packages
ls workspace/gpu_py/grpcio-*.whl > /dev/null 2>&1 || dl grpcio==1.85.1
ls workspace/gpu_py/protobuf-*.whl > /dev/null 2>&1 || dl 'protobuf==4.25.9'
ls workspace/gpu_py/python_rapidjson-*.whl > /dev/null 2>&1 || dl python-rapidjson==1.25
ls workspace/gpu_py/pyzmq-*.whl > /dev/null 2>&1 || dl pyzmq==27.3.0
ls workspace/gpu_py/msgpack-*.whl > /dev/null 2>&1 || dl msgpack==1.2.4
rm -rf workspace/gpu_py/tritonclient
cp -r "$site/tritonclient" workspace/gpu_py/
find workspace/gpu_py/tritonclient -name __pycache__ -prune -exec rm -rf {} +
rm -rf workspace/gpu_py/tritonclient/bin
fi

out=workspace/gpu_perf
cp "$venv/bin/perf_analyzer" /tmp/perf_analyzer.$$ && strip /tmp/perf_analyzer.$$
xz -9 -c /tmp/perf_analyzer.$$ > "$out/perf_analyzer.xz" && rm /tmp/perf_analyzer.$$
b64=$(ldconfig -p | awk '/libb64.so.0d/ {print $NF; exit}')
[ -n "$b64" ] || { echo "libb64.so.0d missing: apt-get install -y libb64-0d" >&2; exit 2; }
cudart=$("$venv/bin/python" -c 'import nvidia.cuda_runtime as m; print(list(m.__path__)[0])')/lib/libcudart.so.12
ssl=$(ldconfig -p | awk '/libssl.so.3 / {print $NF; exit}')
crypto=$(ldconfig -p | awk '/libcrypto.so.3 / {print $NF; exit}')
rm -rf /tmp/gpu_perf.$$ && mkdir -p /tmp/gpu_perf.$$/libs /tmp/gpu_perf.$$/ssl
cp -L "$b64" "$cudart" /tmp/gpu_perf.$$/libs/
cp -L "$ssl" "$crypto" /tmp/gpu_perf.$$/ssl/    # used there only if the image lacks OpenSSL 3
tar -C /tmp/gpu_perf.$$/libs -cJf "$out/libs.tar.xz" . && tar -C /tmp/gpu_perf.$$/ssl -cJf "$out/ssl.tar.xz" .
rm -rf /tmp/gpu_perf.$$ "$out/libb64.so.0d" "$out/libcudart.so.12"
if [ ! -d workspace/bench_tok ]; then   # the demo model's tokenizer (make demo-model), without its weights
  demo=${DATA:-$HOME/.cache/lmtriton}/smollm2-135m-instruct
  [ -f "$demo/tokenizer.json" ] || "$venv/bin/python" -m tools.gguf --out "$demo"
  mkdir -p workspace/bench_tok
  cp "$demo"/{config.json,generation_config.json,tokenizer.json,tokenizer_config.json} workspace/bench_tok/
fi
tar -C workspace -cJf "$out/bench_tok.tar.xz" bench_tok
du -sh workspace/gpu_py "$out"
