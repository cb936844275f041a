#!/usr/bin/env bash
# Set up .venv, build the small bundled demo model (random weights, real llava-hf layout), convert it to
# MindSpore with convert_weight.py and ask run_mindformer.py about a bundled photograph.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup_env.sh test   # the demo model is generated with transformers + torch (CPU)
OUT="${DEMO_DIR:-output/demo}"
mkdir -p "$OUT"
if [ ! -f research/llava/llava_model.py ] || [ ! -f convert_weight.py ] || [ ! -f run_mindformer.py ]; then
  echo "demo: set-up done; the model, converter and predict command have not landed yet (see README, 'Status')." >&2
  exit 3
fi
echo "[demo] building the tiny random-weight checkpoint in llava-hf layout -> $OUT/hf"
python tests/fixtures/make_tiny_llava.py --preset tiny --out "$OUT/hf"
echo "[demo] converting -> $OUT/llava_tiny.ckpt"
python convert_weight.py --model llava --input_path "$OUT/hf" --output_path "$OUT/llava_tiny.ckpt"
echo "[demo] predicting (random weights: the words are meaningless, the pipeline is real)"
python run_mindformer.py --config research/llava/llava_tiny/predict_llava_tiny.yaml \
  --register_path research/llava --run_mode predict \
  --predict_data tests/fixtures/images/chelsea.jpg "Describe the image in English:" \
  --modal_type image text --load_checkpoint "$OUT/llava_tiny.ckpt" \
  --use_parallel False --auto_trans_ckpt False --output_dir "$OUT" --max_new_tokens 16
echo "[demo] results appended to $OUT/predict_results.jsonl"
