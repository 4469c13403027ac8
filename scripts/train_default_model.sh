#!/usr/bin/env bash
# Rebuild the corpus and retrain the built-in English model (elmo_jax/pretrained/), as shipped.
#
#   bash scripts/train_default_model.sh WORK_DIR [STEPS]
#
# 1. corpus: ../shared/corpus/build_corpus.sh (Debian + PyPI text; ~1 minute), into WORK_DIR/corpus
# 2. train:  elmo-jax train with scripts/default_model_train_options.json into WORK_DIR/run
#            (resumes if WORK_DIR/run already holds checkpoints, so a stopped run just continues)
# 3. export: the biLM in the original HDF5 layout + options.json into WORK_DIR/export, and the
#            full-softmax held-out perplexity into WORK_DIR/export/perplexity.json
# Copy WORK_DIR/export/{weights.hdf5,options.json} to elmo_jax/pretrained/ to ship it.
# The shipped model: the default STEPS (21,000: 2.38 epochs), seed 0, on the project's 2-core CPU
# (about 3 h 45 min at ~2,000 tokens/s).
set -euo pipefail
if [[ $# -lt 1 ]]; then
    echo "usage: $0 WORK_DIR [STEPS]" >&2
    exit 2
fi
HERE=$(cd "$(dirname "$0")" && pwd)
WORK=$(realpath -m "$1")
STEPS=${2:-21000}  # the shipped model: 21,000 steps
CORPUS_SCRIPT=${CORPUS_SCRIPT:-$HERE/../../shared/corpus/build_corpus.sh}
mkdir -p "$WORK"

if [[ ! -f "$WORK/corpus/vocab.txt" ]]; then
    bash "$CORPUS_SCRIPT" "$WORK/corpus"
fi

if compgen -G "$WORK/run/checkpoints/*" >/dev/null; then
    elmo-jax train --out "$WORK/run" --resume  # continues up to the STEPS of the first call
else
    elmo-jax train --train-prefix "$WORK/corpus/train/*.txt" --vocab "$WORK/corpus/vocab.txt" \
        --options "$HERE/default_model_train_options.json" --out "$WORK/run" --steps "$STEPS" \
        --seed 0 --log-every 50 --checkpoint-every 250
fi

mkdir -p "$WORK/export"
elmo-jax export "$WORK/run" --weights "$WORK/export/weights.hdf5" --options "$WORK/export/options.json"
elmo-jax perplexity --run-dir "$WORK/run" --test-prefix "$WORK/corpus/heldout/*.txt" \
    --vocab "$WORK/corpus/vocab.txt" > "$WORK/export/perplexity.json"
cat "$WORK/export/perplexity.json"
