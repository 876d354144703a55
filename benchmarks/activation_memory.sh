#!/usr/bin/env bash
# Peak memory per rank with and without --activation-checkpointing: the 166M GPT (gpt-bench-168m,
# block 512) at 2 ranks under ddp, MICRO sequences of 512 tokens per rank per step (one micro-step), the
# same seed and data both times. glibc's mmap threshold is pinned so that resident memory follows live
# tensors (shared/FACTS.md). Prints each run's summary table (peak memory per rank, step time); the
# figures are also in OUT/<flag>/summary.json.
# Usage: bash benchmarks/activation_memory.sh [OUT] [MICRO] [STEPS]   (docs/benchmarks.md: MICRO 1 and 4)
set -euo pipefail
out=${1:-runs/activation-memory}
micro=${2:-1}
steps=${3:-3}
for flag in --no-activation-checkpointing --activation-checkpointing; do
    MALLOC_MMAP_THRESHOLD_=131072 python -m plait.cli train --nproc 2 --model gpt-bench-168m --strategy ddp --data synthetic \
        --synthetic-tokens 200000 --steps "$steps" --batch-size $((2 * micro)) --micro-batch "$micro" \
        --eval-every 0 --no-progress --run-dir "$out/micro$micro/${flag#--}" "$flag"
done
