#!/usr/bin/env bash
# The GPU run of issue 5 in as few device calls as the transfer limit allows.
#
# The device machine (tool library's device/README.md) has Python 3.12, torch (CUDA 13), onnx and
# a CPU-only onnxruntime, but neither onnxruntime-gpu nor diffusers. onnxruntime-gpu 1.31.1 (built
# for CUDA 13) is a 256 MB wheel, while one call carries 64 MiB including this repository (~32 MB
# tracked), so the wheel travels in 33 MiB parts, one per call, calls back to back (a warm machine
# keeps what earlier calls left; it goes back after 30 s idle).
#
#   here:   tools/gpu_kit.sh prepare            # wheels into .whl/ (git-ignored), split into .whl/pN
#   there:  tools/gpu_kit.sh receive            # call N carries .whl/pN: parts kept in /tmp/gpu-kit
#   there:  tools/gpu_kit.sh install            # last part's call: join, verify, install, import check
#   there:  tools/gpu_kit.sh tests              # the gpu-marked tests
#   there:  tools/gpu_kit.sh start export|bench|image-tasks|compare|measure   (measure: bench, then compare)
#                                               # a long step, detached (setsid): it outlives the call
#                                               # that started it while the machine stays warm
#   there:  tools/gpu_kit.sh wait STEP SECONDS  # wait for it at most SECONDS, bring its files back in
#                                               # $OUT; exit 75 while it still runs, else its status
# The long steps: export (sd15-arch's CUDA-target fp16 bundle; the bench would export it too),
# bench (512x512, 30 steps, batch 1 and 4, ours on the CUDA target in fp16 with and without CUDA
# graphs against diffusers' torch fp16), compare (torch vs ONNX, that fp16 CUDA bundle, on CUDA).
# Calls, each right after the last (a machine idle 30 s goes back, and all is lost with it; the
# export alone takes ~8 min): receive ×7; install && start export && tests; wait export;
# start measure && wait measure.
#
# Each "there" step writes its log and results under $OUT (a long step under $KIT/out/STEP, copied
# to $OUT by `wait`: one call brings back 8 files at most), and sources /tmp/gpu-kit/env first (the
# install's PYTHONPATH and the onnxruntime.preload_dlls() hook that finds CUDA and cuDNN in torch's
# nvidia packages).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
KIT=/tmp/gpu-kit
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
ORT_WHEEL=onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl

env_up() {
    # shellcheck disable=SC1091
    source "$KIT/env"
    python3 -c "import onnxruntime as o; assert 'CUDAExecutionProvider' in o.get_available_providers(), o.get_available_providers()"
}

case "${1:-}" in
prepare)
    mkdir -p .whl && rm -rf .whl/p*
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl/dl onnxruntime-gpu==1.31.1 diffusers==0.42.1
    (cd .whl/dl && sha256sum "$ORT_WHEEL" > SHA256 && split -b 33M -d -a 2 "$ORT_WHEEL" ort.part-)
    n=0
    for part in .whl/dl/ort.part-*; do
        n=$((n + 1)); mkdir -p ".whl/p$n"; mv "$part" ".whl/p$n/"
    done
    mv .whl/dl/diffusers-*.whl .whl/dl/SHA256 ".whl/p$n/"
    rm -rf .whl/dl
    echo "$n parts: carry .whl/p1 … .whl/p$n, one per call, back to back; install on the last"
    ;;
receive)
    mkdir -p "$KIT/parts"
    for d in .whl/p*; do if [ -d "$d" ]; then cp -f "$d"/* "$KIT/parts/"; fi; done
    ls -la "$KIT/parts" | tail -n +2
    ;;
install)
    "$REPO/tools/gpu_kit.sh" receive
    cd "$KIT/parts"
    cat ort.part-* > "$ORT_WHEEL"
    sha256sum -c SHA256
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$KIT/site" \
        "$ORT_WHEEL" diffusers-*.whl
    # onnxruntime-gpu finds CUDA 13 and cuDNN in torch's nvidia-* packages once they are preloaded
    cat > "$KIT/site/sitecustomize.py" <<'PY'
try:
    import onnxruntime
    onnxruntime.preload_dlls()
except Exception as e:  # noqa: BLE001
    import sys
    print(f"sitecustomize: onnxruntime.preload_dlls() failed: {e}", file=sys.stderr)
PY
    cat > "$KIT/env" <<EOF
export PYTHONPATH=$KIT/site:$REPO
export PYTHONUNBUFFERED=1
export ORTDIFFUSION_CACHE=$KIT/cache
EOF
    cd "$REPO"
    env_up
    python3 -c "import onnxruntime as o, diffusers, torch; print(o.__version__, o.get_available_providers(), diffusers.__version__, torch.__version__, torch.cuda.get_device_name())" | tee "$OUT/install.txt"
    ;;
tests)
    env_up
    nvidia-smi | tee "$OUT/nvidia-smi.txt"
    python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -rs --timeout 900 2>&1 | tee "$OUT/gpu-tests.txt"
    ;;
export)  # the steps below, run in the foreground with their results in $OUT
    env_up
    python3 -c "from ortdiffusion.models import resolve_bundle; print(resolve_bundle('sd15-arch', target='cuda', precision='fp16'))" \
        2>&1 | tee "$OUT/export.txt"
    ;;
bench)
    env_up
    python3 -m ortdiffusion.cli bench --model sd15-arch --provider cuda \
        --engines ortdiffusion-cuda,ortdiffusion-cuda-graphs,torch --size 512x512 --steps 30 --batch 1,4 \
        --runs 3 --warmup 1 --json "$OUT/bench-sd15-512-gpu.json" --markdown "$OUT/bench-sd15-512-gpu.md" \
        2>&1 | tee "$OUT/bench.txt"
    ;;
image-tasks)
    # issue 25: img2img and inpainting, ours (CUDA target, fp16) against diffusers' own pipelines
    env_up
    for task in image-to-image inpainting; do
        python3 -m ortdiffusion.cli bench --model sd15-arch --provider cuda --task "$task" \
            --engines ortdiffusion-cuda,torch --size 512x512 --steps 30 --runs 3 --warmup 1 \
            --json "$OUT/bench-$task-sd15-512-gpu.json" --markdown "$OUT/bench-$task-sd15-512-gpu.md" \
            2>&1 | tee "$OUT/bench-$task.txt"
    done
    ;;
compare)
    env_up
    bundle=$(python3 -c "from ortdiffusion.models import resolve_bundle; print(resolve_bundle('sd15-arch', target='cuda', precision='fp16'))")
    checkpoint=$(python3 -c "from ortdiffusion.models import resolve_checkpoint; print(resolve_checkpoint('sd15-arch'))")
    python3 -m ortdiffusion.cli compare "$checkpoint" "$bundle" --steps 30 --json "$OUT/compare-sd15-cuda-fp16.json" \
        --image "$OUT/compare-sd15-cuda-fp16.png" 2>&1 | tee "$OUT/compare.txt"
    ;;
measure)
    "$REPO/tools/gpu_kit.sh" bench
    "$REPO/tools/gpu_kit.sh" compare
    ;;
start)
    step=${2:?export, bench, image-tasks, compare or measure}
    mkdir -p "$KIT/out/$step"
    rm -f "$KIT/out/$step.rc"
    OUT="$KIT/out/$step" setsid nohup bash -c "'$REPO/tools/gpu_kit.sh' $step > '$KIT/out/$step.log' 2>&1; echo \$? > '$KIT/out/$step.rc'" \
        < /dev/null > /dev/null 2>&1 &
    echo "started $step"
    ;;
wait)
    step=${2:?a step started with start}
    for _ in $(seq 1 "${3:-540}"); do
        [ -f "$KIT/out/$step.rc" ] && break
        sleep 1
    done
    cp -f "$KIT/out/$step.log" "$OUT/$step.log" 2>/dev/null || true
    cp -f "$KIT/out/$step"/* "$OUT/" 2>/dev/null || true
    tail -n 40 "$OUT/$step.log" 2>/dev/null || true
    if [ ! -f "$KIT/out/$step.rc" ]; then echo "$step: still running"; exit 75; fi
    exit "$(cat "$KIT/out/$step.rc")"
    ;;
*)
    sed -n 2,29p "$0"; exit 2
    ;;
esac
