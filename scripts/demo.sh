#!/usr/bin/env bash
# Set up .venv, build the small bundled demo model (random weights, real llava-hf layout), convert it to
# MindSpore with convert_weight.py and ask run_mindformer.py about a bundled photograph.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup_env.sh test   # the demo model is generated with transformers + torch (CPU)
OUT="${DEMO_DIR:-output/demo}"
mkdir -p "$OUT"
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
echo "[demo] the same model without converting, as a chat server: python run_mindformer.py --config research/llava/llava_tiny/predict_llava_tiny.yaml --run_mode serve --load_checkpoint $OUT/hf  (then open http://127.0.0.1:8000/)"
