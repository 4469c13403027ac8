set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 ELMO_JAX_BENCH="$PWD/.devicebench"
timeout 40 python3 .devicebench/scatter.py | tee $OUT/scatter.txt
for dtype in bfloat16 float32; do
  timeout 100 python3 benchmarks/bench_train.py --config 2x4096_512 --batch 256 --vocab-size 793471 --n-negative 8192 --steps 5 --rounds 1 --dtype $dtype | tee -a $OUT/train.json
done
timeout 150 python3 benchmarks/bench_embed.py --size 2x4096_512_2048cnn_2xhighway --max-sentences 20000 --dtype both --sentences .devicebench/sentences.txt | tee $OUT/embed.json
timeout 60 python3 benchmarks/bench_embed.py --size 2x4096_512_2048cnn_2xhighway --max-sentences 20000 --host-only --sink none --sentences .devicebench/sentences.txt | tee $OUT/embed_host.json
timeout 60 python3 benchmarks/bench_embed.py --size 2x4096_512_2048cnn_2xhighway --max-sentences 20000 --mode top --sentences .devicebench/sentences.txt | tee $OUT/embed_top.json
