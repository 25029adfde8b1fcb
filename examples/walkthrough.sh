#!/usr/bin/env bash
# Train a tiny model on CPU, export it to Hugging Face, load it with transformers and
# generate a few tokens (byte-level tokenizer: ids 0..255 are bytes).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUN=${RUN:-runs/walkthrough}
rm -rf "$RUN"
"$PY" -m rnope_megatron.train recipes/tiny-cpu.yaml logging.run_dir="$RUN" train.iters=60
"$PY" -m rnope_megatron.convert to-hf "$RUN/checkpoints" "$RUN/hf" --dtype fp32 --force
"$PY" - "$RUN/hf" <<'PY'
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
print(type(model).__name__, model.config.layer_types[:4], "window", model.config.sliding_window)
prompt = "def main("
ids = torch.tensor([list(prompt.encode())])
out = model.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=256)
print(repr(bytes(t for t in out[0].tolist() if t < 256).decode("utf-8", "replace")))
PY
