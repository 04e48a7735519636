#!/usr/bin/env bash
# The GPU measurements the open issues ask for, in phases that each fit a 10-minute call on a
# lent GPU machine with no network. From the repository's root:
#
#   bash dev/gpu_session.sh setup sdxl_quick            # SDXL batch 1, checkpointing on, against kohya (one row each)
#   bash dev/gpu_session.sh setup residency sdxl_b1 sdxl_budget   # SDXL batch 1 against kohya's sdxl_train_network.py; 12 GiB
#   bash dev/gpu_session.sh setup sdxl_b4               # SDXL batch 4, the same
#   bash dev/gpu_session.sh setup sdxl_memory           # SDXL batch 4, ours captured and eager: where reserved memory grows
#   bash dev/gpu_session.sh setup tests seed            # GPU tests, smoke run, the seed-sized run + its epochs
#   bash dev/gpu_session.sh setup sd1                   # SD1.5 rows against kohya's train_network.py
#   bash dev/gpu_session.sh setup ranks queue           # one NCCL rank against one process; 2 queued runs on one GPU
#   bash dev/gpu_session.sh setup triton                # the Triton GroupNorm+SiLU: its tests on CUDA, then b8 with and without
#   bash dev/gpu_session.sh setup compile               # compiled UNet blocks against stock at b8 and b2, compile time per shape
#   bash dev/gpu_session.sh setup cold                  # the first step on a fresh machine: page cache, the libraries' warm-up
#   bash dev/gpu_session.sh setup startup               # the seed run's start-up under cProfile, memory over time, kohya beside it
#   bash dev/gpu_session.sh setup startup_kohya_libs    # the same start-up on kohya's transformers 4.54 and peft 0.13.2
#   bash dev/gpu_session.sh setup startup_compiled      # the same with compiled UNet blocks: compile time per bucket shape
#   bash dev/gpu_session.sh setup profile_sources       # SD1.5 b8: the operators and lines behind the elementwise/copy time
#   bash dev/gpu_session.sh setup layout                # channels_last against the standard layout at SD1.5 b2/b8 and SDXL b1 (layout_sd1, layout_sdxl)
#   TREES=".gpu/old ." bash dev/gpu_session.sh setup trees   # one bench row on earlier commits' trees and this one (ROW, NAME)
#
# Inputs, git-ignored and carried along (never committed):
#   .whl/                 wheels for the machine's Python: ldm's and sgm's needs, the optional optimizers
#   .gpu/sgm/             Stability-AI/generative-models' sgm package (SDXL's model code)
#   .gpu/kohya-wheels/    the packages sd-scripts 48d368f pins (transformers 4.54.1, diffusers 0.32.1, …)
#   .gpu/pinned-wheels/   peft 0.13.2 (dev/constraints.txt's), for startup_kohya_libs
#   .kohya/sd-scripts/    sd-scripts 48d368f: library, networks, train_network.py, sdxl_train_network.py
# Results and logs go to $OUT (default /tmp/out).
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 LORAKIT_SGM_DIR="$PWD/.gpu"
export PYTHONPATH="$PWD:/tmp/site"
KOHYA=(--kohya-sd-scripts .kohya/sd-scripts --kohya-python /tmp/kohya-python)

phase_setup() {
    # sgm and ldm's needs beside the machine's own torch; antlr ships as a source archive only.
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/site .whl/* || return
    # sd-scripts' pins come first on its own path only: our process keeps the machine's packages.
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/kohya-site .gpu/kohya-wheels/*.whl || return
    printf '#!/bin/sh\nPYTHONPATH=/tmp/kohya-site:/tmp/site exec python3 "$@"\n' > /tmp/kohya-python && chmod +x /tmp/kohya-python
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
}

phase_tests() {
    python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/gpu_tests.log" | tail -5
    python3 dev/gpu_smoke.py 2>&1 | tee "$OUT/gpu_smoke.log" | tail -5
}

# Which modules sit on the GPU while each cache fills, the memory peak per phase, the model restored;
# later bucket shapes warming up inside the graphs' pool.
phase_residency() {
    python3 -m pytest -q -p no:cacheprovider -s tests/gpu/test_graphs_cuda.py -k "encoders_leave or leaves_the_model or pool" 2>&1 \
        | tee "$OUT/residency.log" | tail -3
}

# Captured against eager steps with gradient accumulation and regularisation images (loss weights).
phase_graphs() {
    python3 -m pytest -q -p no:cacheprovider -s tests/gpu/test_graphs_cuda.py -k accumulated 2>&1 | tee "$OUT/graphs.log" | tail -6
}

# The seed-sized run and its epochs' metrics, then kohya on the same dataset for start-up and memory.
# SEED_LIMIT (seconds) cuts the script short and still copies back what it finished; SEED_KOHYA_STEPS
# shortens kohya's part.
phase_seed() {
    # SEED_ARGS: more of seed_run.py's options (e.g. --no-compare).
    # shellcheck disable=SC2086
    timeout "${SEED_LIMIT:-3600}" python3 dev/seed_run.py --out /tmp/seed "${KOHYA[@]}" --kohya-steps "${SEED_KOHYA_STEPS:-200}" ${SEED_ARGS:-} > "$OUT/seed_out.txt" 2>&1
    tail -4 "$OUT/seed_out.txt"
    cp /tmp/seed/work/projects/kat3r1na/runs/*/epochs.json "$OUT/seed_epochs.json" 2>/dev/null
    cp /tmp/seed/seed_run.json /tmp/seed/train.log /tmp/seed/compare.log "$OUT/" 2>/dev/null
    cp /tmp/seed/work/projects/kat3r1na/runs/*/run.json "$OUT/seed_record.json" 2>/dev/null
    cp /tmp/seed/work/kohya/kohya.log "$OUT/seed_kohya.log" 2>/dev/null
    python3 dev/run_figures.py "$OUT/seed_run.json" "$OUT/seed_record.json"
}

# Where the start-up goes: a short run on the seed dataset (under cProfile with STARTUP_PROFILE=1),
# then again (warm page cache) with -X importtime and nvidia-smi's memory over time, then kohya from
# that run's TOML pair (SEED_KOHYA_STEPS=0: not). $1 names the work folder under /tmp and the files.
startup_rows() {
    local name=$1 work=/tmp/$1 extra=()
    [ "${STARTUP_PROFILE:-0}" = 1 ] && extra+=(--profile)
    [ "${SEED_KOHYA_STEPS:-60}" != 0 ] && extra+=("${KOHYA[@]}" --kohya-steps "${SEED_KOHYA_STEPS:-60}")
    timeout "${STARTUP_LIMIT:-420}" python3 dev/seed_run.py --out "$work" --max-steps "${STARTUP_STEPS:-60}" "${extra[@]}" "${@:2}" 2>&1 | tail -5
    if [ -f "$work/train.prof" ]; then
        python3 -c "import pstats, sys; s = pstats.Stats(sys.argv[1], stream=sys.stdout); s.sort_stats('cumulative').print_stats(150); s.sort_stats('tottime').print_stats(40)
s.print_callers('custom_ops.py|library.py:129|_top_level_inferred|_jit_internal.py.*_overload|fsdp/__init__|graphs.py.*pool|cli/train.py')" \
            "$work/train.prof" > "$OUT/${name}_profile.txt" 2>&1
    fi
    # A call brings back at most 8 files: the logs and records travel as one archive, the figures
    # that matter are printed. -X importtime writes thousands of lines: the log keeps none of them,
    # the slowest imports (cumulative µs, nesting depth, module) go beside it.
    local pack=$work/pack runs=("$work"/work/projects/kat3r1na/runs/*)
    mkdir -p "$pack"
    cp "$work/seed_run.json" "$pack/run.json"
    grep -v "import time:" "$work/train.log" > "$pack/train.log"
    grep "import time:" "$work/train.log" | awk -F'|' '{n = $3; sub(/^ /, "", n); depth = match(n, /[^ ]/) - 1
        if (depth <= 8) print $2, depth / 2, substr(n, depth + 1)}' | sort -rn | head -150 > "$pack/imports.txt"
    local i log
    for log in "$work"/*.log; do [ "${log##*/}" = train.log ] || cp "$log" "$pack/"; done
    for i in "${!runs[@]}"; do cp "${runs[$i]}/run.json" "$pack/record_$i.json" 2>/dev/null; done
    cp "$work/work/kohya/kohya.log" "$pack/kohya.log" 2>/dev/null
    tar -czf "$OUT/$name.tgz" -C "$pack" .
    python3 dev/run_figures.py "$pack/run.json" "$pack"/record_*.json
    head -12 "$pack/imports.txt"
}
phase_startup() { startup_rows startup; }

# The first step on a freshly started machine took 9.4 s against 1.3–1.7 s later: whether that is the
# CUDA libraries' pages missing from the page cache, and whether the run's background read of them
# (lorakit_ext.cli.library_warmup) hides it (COLD=libraries), or the CUDA driver's JIT cache (COLD=jit-cache).
# First of a fresh machine's phases.
phase_cold() { SEED_KOHYA_STEPS=0 STARTUP_STEPS=${STARTUP_STEPS:-30} startup_rows cold --cold "${COLD:-libraries}"; }

# The same short run with the UNet's blocks compiled: compile time per bucket shape (graph_pools'
# first warm-up step of each), set against the per-step gain phase_compile measures, tells whether
# compiling pays on the seed run's 6 300 steps.
phase_startup_compiled() { SEED_KOHYA_STEPS=0 STARTUP_STEPS=${STARTUP_STEPS:-200} startup_rows startup_compiled --compile-blocks; }

# The same start-up with kohya's library set in front of the machine's (transformers 4.54.1,
# accelerate 1.6, huggingface_hub 0.34, from .gpu/kohya-wheels) and dev/constraints.txt's peft
# 0.13.2 (.gpu/pinned-wheels): what the machine's transformers 5 costs the imports, and both sides
# on the same libraries.
phase_startup_kohya_libs() {
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/pinned .gpu/pinned-wheels/*.whl || return
    local path="/tmp/pinned:/tmp/kohya-site:$PYTHONPATH"
    PYTHONPATH=$path python3 -c "import transformers, peft, accelerate, huggingface_hub as h
print('kohya libs: transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__, 'hub', h.__version__)" \
        | tee -a "$OUT/gpu.txt"
    PYTHONPATH=$path startup_rows startup_kohya_libs
}

# Graphs only and few steps, so that both sides' rows of one batch size fit a call; kohya's
# start-up (about 100 s to its first step) dominates the time either way.
sdxl_rows() {
    python3 -m lorakit_ext bench train --family sdxl "${KOHYA[@]}" --weights bf16 --batch "$1" --gradient-checkpointing off,on \
        --modes graphs --steps 20 --warmup 5 --json > "$OUT/bench_sdxl_b$1.json" 2> "$OUT/bench_sdxl_b$1.log"
    tail -30 "$OUT/bench_sdxl_b$1.log"
}

# Ours alone (no kohya rows): a quick first look, and a check that SDXL trains on this GPU at all.
phase_sdxl_ours() {
    python3 -m lorakit_ext bench train --family sdxl --weights bf16 --batch 1,4 --gradient-checkpointing off,on \
        --modes graphs --steps 30 --warmup 5 --json > "$OUT/bench_sdxl_ours.json" 2> "$OUT/bench_sdxl_ours.log"
    tail -25 "$OUT/bench_sdxl_ours.log"
}

# Ours alone at batch 1, checkpointing off and on: memory at HEAD beside kohya's earlier same-run rows.
phase_sdxl_ours_b1() {
    python3 -m lorakit_ext bench train --family sdxl --weights bf16 --batch 1 --gradient-checkpointing off,on \
        --modes graphs --steps 20 --warmup 5 --json > "$OUT/bench_sdxl_ours_b1.json" 2> "$OUT/bench_sdxl_ours_b1.log"
    tail -12 "$OUT/bench_sdxl_ours_b1.log"
}

# Both sides at batch 1 with gradient checkpointing, graphs only, fewer steps: one comparison row
# that fits a call together with the set-up.
phase_sdxl_quick() {
    python3 -m lorakit_ext bench train --family sdxl "${KOHYA[@]}" --weights bf16 --batch 1 --gradient-checkpointing on \
        --modes graphs --steps 30 --warmup 5 --json > "$OUT/bench_sdxl_quick.json" 2> "$OUT/bench_sdxl_quick.log"
    tail -30 "$OUT/bench_sdxl_quick.log"
}

# Ours alone at batch 4, captured and eager: whether the cache beyond the live tensors (reserved
# above allocated) comes with the capture, and per phase and per captured shape where it grows.
# sdxl_memory_expandable: the same under torch's expandable segments, against fragmentation.
sdxl_memory_rows() {
    python3 -m lorakit_ext bench train --family sdxl --weights bf16 --batch 4 --gradient-checkpointing off,on \
        --modes graphs,eager --steps 10 --warmup 5 --images 32 --json > "$OUT/bench_sdxl_memory$1.json" 2> "$OUT/bench_sdxl_memory$1.log"
    python3 -c "import json, sys
for r in json.load(open(sys.argv[1]))['rows']:
    print(r['mode'], 'gc' if r['gradient_checkpointing'] else 'nogc', {k: r.get(k) for k in ('it_per_s', 'peak_allocated_gib', 'peak_reserved_gib', 'smi_peak_gib')})
    print('  peaks', r.get('memory_peaks_gib')); print('  pools', r.get('graph_pools'))" "$OUT/bench_sdxl_memory$1.json"
}
phase_sdxl_memory() { sdxl_memory_rows ""; }
phase_sdxl_memory_expandable() { PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True sdxl_memory_rows _expandable; }

phase_sdxl_b1() { sdxl_rows 1; }
phase_sdxl_b4() { sdxl_rows 4; }

# The whole model stays resident (as in A1111), so the budget covers it too.
phase_sdxl_budget() {
    for gib in ${SDXL_BUDGETS:-12 8 7}; do
        python3 -m lorakit_ext bench train --family sdxl --weights bf16 --batch 1 --gradient-checkpointing on \
            --memory-budget-gib "$gib" --modes graphs --steps 10 --warmup 3 --images 16 --json > "$OUT/bench_sdxl_budget$gib.json" 2> "$OUT/bench_sdxl_budget$gib.log"
        python3 -c "import json, sys; r = json.load(open(sys.argv[1]))['rows'][0]; print(sys.argv[2], 'GiB: out of memory' if r['out_of_memory'] else f\"GiB: {r['it_per_s']:.2f} it/s, allocated {r['peak_allocated_gib']:.2f}, reserved {r['peak_reserved_gib']:.2f} GiB\")" "$OUT/bench_sdxl_budget$gib.json" "$gib"
    done
}

phase_sd1() {
    python3 -m lorakit_ext bench train "${KOHYA[@]}" --weights bf16 --batch 2 --train te,unet --json > "$OUT/bench_sd1_b2.json" 2> "$OUT/bench_sd1_b2.log"
    python3 -m lorakit_ext bench train "${KOHYA[@]}" --weights bf16 --batch 8 --train unet --kernel-breakdown --json > "$OUT/bench_sd1_b8.json" 2> "$OUT/bench_sd1_b8.log"
    tail -20 "$OUT/bench_sd1_b2.log" "$OUT/bench_sd1_b8.log"
}

# The data-parallel path at world size 1 (NCCL, CUDA graphs) against the plain one: its GPU test,
# then bench rows of both (the bar: ≥ 0.97× the plain it/s).
phase_ranks() {
    python3 -m pytest -q -p no:cacheprovider -s tests/gpu/test_graphs_cuda.py -k data_parallel 2>&1 | tee "$OUT/ranks_test.log" | tail -4
    python3 -m lorakit_ext bench train --weights bf16 --modes graphs --steps 200 --warmup 20 --json > "$OUT/bench_plain.json" 2> "$OUT/bench_plain.log"
    python3 -m lorakit_ext bench train --weights bf16 --modes graphs --steps 200 --warmup 20 --gpus 1 --json > "$OUT/bench_ranks1.json" 2> "$OUT/bench_ranks1.log"
    python3 -c "import json; a, b = (json.load(open('$OUT/bench_' + n + '.json'))['rows'][0]['it_per_s'] for n in ('plain', 'ranks1')); print(f'plain {a:.2f} it/s, one NCCL rank {b:.2f} it/s: {b / a:.3f}x')"
}

# The channels_last GroupNorm(+SiLU) Triton kernels (opt-in): correct on CUDA against torch and in
# the captured step against eager, then SD1.5 UNet-only batch 8 with and without them.
phase_triton() {
    python3 -m pytest -q -p no:cacheprovider tests/test_triton_group_norm.py 2>&1 | tee "$OUT/triton_tests.log" | tail -3
    LORAKIT_TRITON_GROUP_NORM=1 python3 -m pytest -q -p no:cacheprovider -s tests/gpu/test_graphs_cuda.py -k "fifty and bf16" 2>&1 | tail -4
    for on in 0 1; do
        LORAKIT_TRITON_GROUP_NORM=$on python3 -m lorakit_ext bench train --weights bf16 --batch 8 --train unet --modes graphs \
            --kernel-breakdown --json > "$OUT/bench_b8_triton$on.json" 2> "$OUT/bench_b8_triton$on.log"
        python3 -c "import json, sys; r = json.load(open(sys.argv[1]))['rows'][0]; k = r['kernels']
print('triton', sys.argv[2], f\"{r['it_per_s']:.2f} it/s, step {k['step_ms']:.1f} ms:\", {n: round(ms, 1) for n, ms in k['kinds_ms'].items()})" \
            "$OUT/bench_b8_triton$on.json" "$on"
    done
}

# Which operators and Python lines the elementwise/copy/cast time of SD1.5 UNet batch 8 comes
# from (backward operators on the forward lines they differentiate).
phase_profile_sources() {
    python3 dev/profile_step.py --batch 8 --train unet --sources --top 40 > "$OUT/profile_sources_b8.txt" 2>&1
    sed -n '/by operator/,$p' "$OUT/profile_sources_b8.txt" | cut -c1-220 | head -30
}

# Compiled UNet blocks against stock at SD1.5 UNet-only batch 8 (COMPILE_BATCHES: others), graphs:
# it/s, the first warm-up step per shape (the compile time) and each row's kernel time by kind. Each
# row is printed as it ends, so COMPILE_LIMIT still leaves what finished.
phase_compile() {
    timeout "${COMPILE_LIMIT:-420}" python3 -m lorakit_ext bench train --weights bf16 --batch "${COMPILE_BATCHES:-8}" --train unet \
        --modes graphs --compile-blocks off,on --steps 100 --warmup 10 --kernel-breakdown --json > "$OUT/bench_compile.json" 2> "$OUT/bench_compile.log"
    grep -E "^row |^bf16|^note" "$OUT/bench_compile.log"
    python3 -c "import json, sys
for r in json.load(open(sys.argv[1]))['rows']:
    k = r.get('kernels') or {}
    print('compiled' if r['compiled_blocks'] else 'stock', r['batch'], round(r.get('it_per_s') or 0, 2), 'it/s, smi', r.get('smi_peak_gib'),
          'kernel ms', round(k.get('step_ms', 0), 1), {n: round(ms, 1) for n, ms in k.get('kinds_ms', {}).items()})" "$OUT/bench_compile.json" 2>/dev/null
}

# channels_last against the standard layout, SD1.5 UNet-only b2 and b8 and SDXL b1 (graphs): the
# per-batch layout choice is made from these rows.
phase_layout_sd1() {
    python3 -m lorakit_ext bench train --weights bf16 --batch 2,8 --train unet --modes graphs --channels-last off,on \
        --steps 100 --warmup 10 --json > "$OUT/bench_layout_sd1.json" 2> "$OUT/bench_layout_sd1.log"
    layout_rows "$OUT/bench_layout_sd1.json"
}
phase_layout_sdxl() {
    python3 -m lorakit_ext bench train --family sdxl --weights bf16 --batch 1 --modes graphs --channels-last off,on \
        --steps 30 --warmup 5 --json > "$OUT/bench_layout_sdxl.json" 2> "$OUT/bench_layout_sdxl.log"
    layout_rows "$OUT/bench_layout_sdxl.json"
}
phase_layout() { phase_layout_sd1; phase_layout_sdxl; }
layout_rows() {
    python3 -c "import json, sys
for r in json.load(open(sys.argv[1]))['rows']:
    print('batch', r['batch'], 'channels_last', r['channels_last'], f\"{r['it_per_s']:.2f} it/s, reserved {r['peak_reserved_gib']:.2f} GiB\")" "$1"
}

# One bench row on several source trees one after another on the same GPU: what each commit
# changed. TREES: folders holding a tree each (`git archive <commit> | tar -x -C .gpu/<name>`,
# carried along; "." is this one), ROW: the bench options, NAME: the row's name in $OUT.
phase_trees() {
    local tree
    for tree in ${TREES:-.}; do
        # shellcheck disable=SC2086
        (cd "$tree" && PYTHONPATH="$PWD:/tmp/site" python3 -m lorakit_ext bench train ${ROW:---weights bf16 --batch 8 --train unet --modes graphs} --json) \
            >> "$OUT/trees_${NAME:-row}.jsonl" 2> /tmp/trees.log
        grep "^row" /tmp/trees.log | sed "s|^|$tree |" | tee -a "$OUT/trees.txt"
    done
}

phase_queue() {
    python3 dev/queue_bench.py --out /tmp/queue 2>&1 | tail -30
    cp /tmp/queue/queue_bench.json "$OUT/" 2>/dev/null
}

for phase in "$@"; do
    echo "== $phase $(date +%T)"
    "phase_$phase" || echo "== $phase FAILED"
done
