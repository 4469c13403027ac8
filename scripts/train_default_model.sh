#!/usr/bin/env bash
# Rebuild the corpus and retrain the built-in English model (elmo_jax/pretrained/), as shipped.
#
#   bash scripts/train_default_model.sh WORK_DIR [STEPS] [MORE_STEPS]
#
# 1. corpus:  ../shared/corpus/build_corpus.sh (Debian + PyPI text; ~1 minute), into WORK_DIR/corpus
# 2. stage 1: elmo-jax train with scripts/default_model_train_options.json into WORK_DIR/run, STEPS steps
#             on the base corpus
# 3. stage 2: scripts/build_supplement.py mixes modern finance manuals into the base corpus
#             (WORK_DIR/supplement/mix); the same run continues MORE_STEPS steps on the mix
#             (elmo-jax train --resume --train-prefix)
# 4. export:  the biLM in the original HDF5 layout + options.json into WORK_DIR/export, and the
#             full-softmax perplexity on the base corpus's held-out text (perplexity.json) and on the
#             supplement's (perplexity_finance.json)
# Every stage resumes: run the script again after a stop and it continues from the last checkpoint
# (every 250 steps). Copy WORK_DIR/export/{weights.hdf5,options.json} to elmo_jax/pretrained/ to ship it.
# The shipped model: the default STEPS (21,000) and MORE_STEPS (MORE_STEPS_DEFAULT below), seed 0, on the
# project's 2-core CPU at ~2,000 tokens/s (MODEL_CARD.md).
set -euo pipefail
if [[ $# -lt 1 ]]; then
    echo "usage: $0 WORK_DIR [STEPS] [MORE_STEPS]" >&2
    exit 2
fi
HERE=$(cd "$(dirname "$0")" && pwd)
WORK=$(realpath -m "$1")
MORE_STEPS_DEFAULT=15000
STEPS=${2:-21000}                       # stage 1 of the shipped model
MORE_STEPS=${3:-$MORE_STEPS_DEFAULT}    # stage 2 of the shipped model
SHARED_CORPUS=${SHARED_CORPUS:-$HERE/../../shared/corpus}
RUN="$WORK/run"
mkdir -p "$WORK"

latest_step() {  # the step of the run's latest checkpoint, 0 if none
    local step
    step=$(find "$RUN/checkpoints" -mindepth 1 -maxdepth 1 -type d -regex '.*/[0-9]+' -printf '%f\n' 2>/dev/null \
        | sort -n | tail -1)
    echo "${step:-0}"
}

if [[ ! -f "$WORK/corpus/vocab.txt" ]]; then
    bash "$SHARED_CORPUS/build_corpus.sh" "$WORK/corpus"
fi

done_steps=$(latest_step)
if (( done_steps == 0 )); then
    elmo-jax train --train-prefix "$WORK/corpus/train/*.txt" --vocab "$WORK/corpus/vocab.txt" \
        --options "$HERE/default_model_train_options.json" --out "$RUN" --steps "$STEPS" \
        --seed 0 --log-every 50 --checkpoint-every 250
elif (( done_steps < STEPS )); then
    elmo-jax train --out "$RUN" --resume --steps $(( STEPS - done_steps ))
fi

if (( MORE_STEPS > 0 )); then
    if [[ ! -f "$WORK/supplement/stats.json" ]]; then
        python3 "$HERE/build_supplement.py" "$WORK/corpus" "$WORK/supplement" --corpus-text "$SHARED_CORPUS"
    fi
    left=$(( STEPS + MORE_STEPS - $(latest_step) ))
    if (( left > 0 )); then
        # Switches the run to the mix on the first call, then just resumes it.
        elmo-jax train --out "$RUN" --resume --train-prefix "$WORK/supplement/mix/*.txt" --steps "$left"
    fi
fi

mkdir -p "$WORK/export"
elmo-jax export "$RUN" --weights "$WORK/export/weights.hdf5" --options "$WORK/export/options.json"
elmo-jax perplexity --run-dir "$RUN" --test-prefix "$WORK/corpus/heldout/*.txt" \
    --vocab "$WORK/corpus/vocab.txt" > "$WORK/export/perplexity.json"
cat "$WORK/export/perplexity.json"
if [[ -f "$WORK/supplement/finance/heldout.txt" ]]; then
    elmo-jax perplexity --run-dir "$RUN" --test-prefix "$WORK/supplement/finance/heldout.txt" \
        --vocab "$WORK/corpus/vocab.txt" > "$WORK/export/perplexity_finance.json"
    cat "$WORK/export/perplexity_finance.json"
fi
