#!/bin/bash
# One device call (~2 minutes) for the GEMM main-loop switches (docs/gemm.md, "Session of 2026-11-30 05:35 UTC"
# and the 06:31 results): GPU bit-identity tests, settled A/B timings against the controls, ncu cycles. Needs the
# cubins that benchmarks/prebuild_gemm_experiments.py built from this commit in .jit_gemmnx (run tool: carry
# [".jit_gemmnx"]).
# Writes logs under $OUT (or ./gemmnx_out); each step has its own time limit, so a slow one cannot eat the rest.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} DEEPSTACK_JIT_CACHE_DIR=$PWD/.jit_gemmnx
OUT=${OUT:-$PWD/gemmnx_out}; mkdir -p "$OUT"
python benchmarks/prebuild_gemm_experiments.py --check | head -5
nvidia-smi --query-gpu=name,power.draw,power.limit,clocks.sm,temperature.gpu --format=csv,noheader
timeout 25 python -m pytest -q -m cuda tests/gemm/test_gemm_cuda.py \
  -k "lookahead2 or lean_slice or multicast_tma or id_lookahead_matches" > "$OUT/tests.txt" 2>&1
tail -2 "$OUT/tests.txt"
timeout 25 python benchmarks/ab_gemm.py --steady --jobs 1 --check-rows 256 \
  --shapes c4x8192x7168x2048,c4x8192x4096x7168,32768x7168x2048 \
  --variant default: --variant la1:DS_ID_LOOKAHEAD1 --variant la1_nolean:DS_ID_LOOKAHEAD1,DS_NO_LEAN_SLICE \
  > "$OUT/ab_contig.txt" 2>&1
timeout 28 python benchmarks/ab_gemm.py --steady --jobs 1 --check-rows 256 \
  --shapes 4096x7168x2048,4096x4096x7168,4096x7168x16384,4096x24576x1536,4096x32768x512,4096x2112x7168 \
  --variant default: --variant nolean:DS_NO_LEAN_SLICE --variant mc2::2 > "$OUT/ab_dense.txt" 2>&1
timeout 45 ncu --clock-control none --profile-from-start off --csv \
  --metrics gpu__time_duration.sum,sm__cycles_active.avg,smsp__inst_executed.sum,sm__cycles_elapsed.avg.per_second,smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio,lts__t_bytes.sum \
  python benchmarks/ncu_gemm.py --shapes c4x8192x7168x2048,32768x7168x2048,4096x4096x7168 \
  --variant default: --variant la1:DS_ID_LOOKAHEAD1 --variant nolean:DS_NO_LEAN_SLICE > "$OUT/ncu.csv" 2>&1
grep -E "^\| |WRONG|Error|error" "$OUT/ab_contig.txt" "$OUT/ab_dense.txt" | cut -d: -f2- | tail -40
grep -E "profiled" "$OUT/ncu.csv" | tr '\n' ' '; echo
python - "$OUT/ncu.csv" <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10 and r[0].isdigit()]
by = collections.defaultdict(dict)
for r in rows:   # ID, ..., Metric Name, Metric Unit, Metric Value (ncu --csv); launches in ncu_gemm.py's order
    by[int(r[0])][r[-3]] = r[-1]
for i, m in sorted(by.items()):
    print(i, {k.split("__")[1][:28]: v for k, v in m.items()})
PY
