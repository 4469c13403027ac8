#!/usr/bin/env bash
# The GPU measurements that issues #16 and #18 ask for, as one command for the `device` tool (a session that is
# lent a GPU has 15 minutes of device time for all its tries).
#
# #16: bench_embed.py at the published size 2x4096_512_2048cnn_2xhighway, float32 and bfloat16 (tokens/s, fraction
#      of the device's matmul peak measured in the same dtype).
#      With what reads those figures: the top layer alone (a third of the output bytes), the host side alone
#      (--host-only) and the device-to-host copy rate (bench_transfer.py). On the H200 of 2026-12-04 all layers
#      in float32 moved at that copy rate (README, Performance); --gathers tries two ways past it. And the
#      float32 outputs against the CPU's at XLA's default precision and at full float32 (bench_precision.py).
# #18: bench_train.py at 2x4096_512 and the published 793,471-word vocabulary, float32 and bfloat16 (tokens/s,
#      fraction of the matmul peak).
#
# The device machine gets only the repository: the random weights and the sentences come from ../shared/bench,
# copied once into an ignored folder that travels with the run:
#
#     mkdir -p .devicebench && cp ../shared/bench/{make_weights.py,common.py,sentences.txt} .devicebench/
#     mkdir -p .git/info && (grep -qx '/.devicebench/' .git/info/exclude || echo /.devicebench/ >> .git/info/exclude)
#
# then run(command="bash benchmarks/device_checks.sh", carry=[".devicebench"], timeout_s=600): ~7 minutes on an
# H200, with the machine's start (an estimate from the parts' times there). Its packages are the machine's own
# (JAX with CUDA, h5py, flax, optax, orbax, tqdm): nothing is installed, the repository is put on PYTHONPATH.
# Each benchmark prints JSON lines into one of 8 files under $OUT, the most the device tool brings back (so add
# no log file there). DEVICE_CHECKS_QUICK=1 runs the same commands at a tiny size (a CPU check of this script).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 ELMO_JAX_BENCH="$PWD/.devicebench"
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
python="$(command -v python3)"
if [[ ! -f .devicebench/make_weights.py || ! -f .devicebench/common.py || ! -f .devicebench/sentences.txt ]]; then
    echo "device_checks.sh: .devicebench/ lacks make_weights.py, common.py or sentences.txt (see the top comment)" >&2
    exit 2
fi
if [[ "${DEVICE_CHECKS_QUICK:-0}" == 1 ]]; then
    embed_size=2x1024_128_2048cnn_1xhighway; sentences=40; precision_sentences=20
    train=(--config 2x1024_128 --batch 8 --vocab-size 20000 --n-negative 1024 --steps 1 --rounds 1)
else
    embed_size=2x4096_512_2048cnn_2xhighway; sentences=20000; precision_sentences=2000
    train=(--config 2x4096_512 --batch 256 --vocab-size 793471 --n-negative 8192 --steps 5 --rounds 1)
fi
status=0
"$python" -c "import jax; print(jax.__version__, jax.devices())" 2>&1 | tee "$OUT/devices.txt" || status=1
# tokens/s of Embedder.embed_sentences (warm passes), float32 then bfloat16, each against its own matmul peak
# (the random weights go to the temporary folder, not $OUT: ~400 MB at the published size)
timeout 270 "$python" benchmarks/bench_embed.py --size "$embed_size" --max-sentences "$sentences" --dtype both \
    --sentences .devicebench/sentences.txt | tee "$OUT/embed.json" || status=1
for dtype in float32 bfloat16; do
    timeout 120 "$python" benchmarks/bench_train.py "${train[@]}" --dtype "$dtype" | tee -a "$OUT/train.json" \
        || status=1
done
timeout 60 "$python" benchmarks/bench_transfer.py | tee "$OUT/transfer.json" || status=1
timeout 90 "$python" benchmarks/bench_embed.py --size "$embed_size" --max-sentences "$sentences" --mode top \
    --sentences .devicebench/sentences.txt | tee "$OUT/embed_top.json" || status=1
timeout 60 "$python" benchmarks/bench_embed.py --size "$embed_size" --max-sentences "$sentences" --host-only \
    --sink none --sentences .devicebench/sentences.txt | tee "$OUT/embed_host.json" || status=1
# the experiment that comes next (bench_embed.route_gathers): the gathers' copies started at dispatch, or into
# pinned host memory, against the float32 line of embed.json
for gathers in copy_async pinned_host; do
    timeout 90 "$python" benchmarks/bench_embed.py --size "$embed_size" --max-sentences "$sentences" \
        --gathers "$gathers" --sentences .devicebench/sentences.txt | tee -a "$OUT/embed_gathers.json" || status=1
done
# float32 outputs on the device against its CPU's, at XLA's default precision (TF32-like on a GPU) and at full
# float32, with the speed of each (bench_precision.py): what the Embedder's default precision should be
timeout 150 "$python" benchmarks/bench_precision.py --size "$embed_size" --max-sentences "$precision_sentences" \
    --mode top --sentences .devicebench/sentences.txt | tee "$OUT/precision.json" || status=1
exit "$status"
