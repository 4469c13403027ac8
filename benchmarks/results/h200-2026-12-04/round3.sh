set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 ELMO_JAX_BENCH="$PWD/.devicebench"
timeout 40 python3 .devicebench/d2h.py | tee $OUT/d2h.txt
for od in float16 float32; do
timeout 100 python3 benchmarks/bench_embed.py --size 2x4096_512_2048cnn_2xhighway --max-sentences 20000 --whole-process --repeats 2 --output-dtype $od --sentences .devicebench/sentences.txt | tee -a $OUT/embed_whole.json
done
