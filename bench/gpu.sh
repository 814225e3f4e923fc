#!/usr/bin/env bash
# The GPU figures of bench/RESULTS.md in one run: training step time, first step, overhead and
# peak VRAM on SD1.5 at 512 px and SDXL at 1024 px (random full-size weights), class-prior
# throughput, and whether channels-last pays for the UNet.
#
#   bash bench/gpu.sh OUT_DIR                    # on a CUDA machine with torch; writes OUT_DIR/*.txt
#   SD15=sd1-tiny SDXL=sdxl-tiny RES15=64 RESXL=64 PRIOR_RES=64 bash bench/gpu.sh /tmp/out   # rehearsal on CPU
#
# Needs the pack importable as `dreambooth_lora` (pip install -e ., or PYTHONPATH with a link to
# the root under that name) and diffusers/peft/transformers. Each part has its own time limit and
# the next part runs even if one fails, so one problem does not cost the other figures.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash bench/gpu.sh OUT_DIR}
mkdir -p "$OUT"
PY=${PY:-python3}
SD15=${SD15:-sd15-full} SDXL=${SDXL:-sdxl-full}
RES15=${RES15:-512} RESXL=${RESXL:-1024} PRIOR_RES=${PRIOR_RES:-512}
export PYTHONUNBUFFERED=1

part() {  # part NAME SECONDS COMMAND...: run, log to OUT/NAME.txt, keep going on failure
    local name=$1 limit=$2
    shift 2
    local begun=$SECONDS
    echo "=== $name: $*"
    timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - begun)) s"
    grep -v -E '^(\s*$|.*it/s\]|.*s/it\]|.*img/s\])' "$OUT/$name.txt" | tail -15
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"; } | tee "$OUT/machine.txt"
$PY -c "import torch, diffusers, peft, transformers, accelerate; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)" | tee -a "$OUT/machine.txt"

part fixtures 240 $PY -c "
import time
from dreambooth_lora.fixtures.checkpoints import fixture_path
for name in ('$SD15', '$SDXL'):
    t = time.perf_counter(); path = fixture_path(name); print(name, path, f'{time.perf_counter() - t:.1f} s')"
part syncs 120 $PY bench/syncs.py
part sd15_speed 240 $PY bench/train.py --fixture "$SD15" --resolution "$RES15" --steps 12 --warmup 4 --mixed-precision bf16 --json "$OUT/sd15_speed.json"
part sd15_memory 180 $PY bench/train.py --fixture "$SD15" --resolution "$RES15" --steps 8 --warmup 3 --memory --sides reference,ours-cached --json "$OUT/sd15_memory.json"
part sdxl_memory 300 $PY bench/train.py --fixture "$SDXL" --resolution "$RESXL" --steps 8 --warmup 3 --memory --sides reference,ours-cached --json "$OUT/sdxl_memory.json"
part sdxl_speed 300 $PY bench/train.py --fixture "$SDXL" --resolution "$RESXL" --steps 10 --warmup 4 --mixed-precision bf16 --json "$OUT/sdxl_speed.json"
part priors 180 $PY bench/priors.py --base "$($PY -c "from dreambooth_lora.fixtures.checkpoints import fixture_path; print(fixture_path('$SD15'))")" --num 16 --batch-size 8 --steps 20 --resolution "$PRIOR_RES" --repeats 2
part channels_last 120 $PY bench/unet_formats.py --fixture "$SD15" --resolution "$RES15"
