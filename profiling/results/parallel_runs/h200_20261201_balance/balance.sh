#!/bin/bash
# balance helper: about 4.5 minutes on one H200 (cuda:0), 4.9 at most; outputs under $OUT/balance/.
# Is rank 1's share of the P=2 partition of o320_l7 (1024 ch x 16 layers x 16 heads, triton,
# compiled, planner policies for 130 GiB as on the fast path) more work than rank 0's? Every
# share is timed alone, no communication, on the same GPU (profiling/bench_parallel.py shares):
#  1. both SFC shares in one process, interleaved rounds (shared autotune choices);
#  2. each SFC share in a process of its own (its own autotune choices, as a rank process makes);
#  3. SFC and the index-range partition (uneven rows/edges per rank) in one process: does the
#     counted work (squall.parallel.partition.part_work) predict the timed ratio?
[ -d /tmp/site/zarr ] || source _gpu/common.sh
export PYTHONPATH=src:/tmp/site PYTHONUNBUFFERED=1 SQUALL_GT_KERNEL=${SQUALL_GT_KERNEL:-flat}
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
export SQUALL_GIT_SHA=${SQUALL_GIT_SHA:-$(cat _gpu/sha 2>/dev/null)}
O=$OUT/balance
mkdir -p $O
t0=$(date +%s)
BUDGET=290
left() { echo $(( BUDGET - ($(date +%s) - t0) )); }
cap() { local l; l=$(left); [ "$l" -lt "$1" ] && echo "$l" || echo "$1"; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv,noheader | tee $O/device.txt
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'sha', '$SQUALL_GIT_SHA')" | tee -a $O/device.txt
B="profiling/bench_parallel.py shares --graph o320_l7 --cache /tmp/squall-graphs --parts 2 --budget-gib 130"

run() {  # run NAME LIMIT_S MIN_S ARGS...: one shares run into $O/NAME (skipped below MIN_S left)
  local name=$1 limit=$2 min=$3; shift 3
  local l; l=$(cap "$limit")
  if [ "$l" -lt "$min" ]; then echo "=== $name skipped: $(left) s left"; return; fi
  echo "=== $name start at $(( $(date +%s) - t0 )) s (limit $l s)"
  nvidia-smi --query-gpu=temperature.gpu,clocks.sm,power.draw --format=csv,noheader > $O/$name.gpu_before.txt
  timeout "$l" python3 $B "$@" --out "$O/$name" > "$O/$name.log" 2>&1
  echo "=== $name rc=$? at $(( $(date +%s) - t0 )) s"
  nvidia-smi --query-gpu=temperature.gpu,clocks.sm,power.draw --format=csv,noheader > $O/$name.gpu_after.txt
  grep "warm-up\|: step\| over \|Error\|error:" "$O/$name.log" | tail -20
}

run both 150 60 --partitions sfc --rounds 12 --trace 3
run alone1 60 35 --partitions sfc --ranks 1 --rounds 6 --trace 0
run alone0 60 35 --partitions sfc --ranks 0 --rounds 6 --trace 0
run ranges 110 60 --partitions sfc ranges --rounds 6 --trace 2
echo "=== done $(( $(date +%s) - t0 )) s"
ls -la $O $O/*/
