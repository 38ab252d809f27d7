#!/usr/bin/env bash
# The paper's FineWeb-Edu language-model run, end to end: parquet shards -> byte-level BPE
# tokenizer -> indexed dataset -> pretraining -> Hugging Face export -> zero-shot scores.
# Every stage is one of our commands; README.md next to this file explains each.
#
#   recipes/fineweb_edu/run.sh                      # all stages
#   recipes/fineweb_edu/run.sh preprocess train     # some stages, in the order given
#
# Settings (environment): SIZE=45m|180m, MODEL=kla|hybrid, PARQUET (shards: a directory or glob),
# WORK (outputs), VOCAB, WORKERS, TOKENIZER_SAMPLE (bytes per shard), LAUNCH (how the trainer
# starts), TRAIN_ARGS (extra kla-pretrain arguments), TASKS, EVAL_ARGS (extra kla-eval arguments).
set -euo pipefail
cd "$(dirname "$0")/../.." || exit 1

SIZE=${SIZE:-45m}
MODEL=${MODEL:-kla}
PARQUET=${PARQUET:-data/fineweb-edu/sample/10BT}
WORK=${WORK:-runs/fineweb_edu_${MODEL}_${SIZE}}
VOCAB=${VOCAB:-32768}
WORKERS=${WORKERS:-$(nproc)}
TOKENIZER_SAMPLE=${TOKENIZER_SAMPLE:-64M}
LAUNCH=${LAUNCH:-torchrun --nproc-per-node ${GPUS:-8} -m kla_megatron.train}
TRAIN_ARGS=${TRAIN_ARGS:-}
TASKS=${TASKS:-lambada_openai,hellaswag,piqa,arc_easy,arc_challenge,winogrande,boolq,openbookqa}
EVAL_ARGS=${EVAL_ARGS:-}

CONFIG=configs/paper_${MODEL}_${SIZE}.yaml
TOKENIZER=$WORK/tokenizer/fineweb_edu.tiktoken
DATASET=$WORK/data/fineweb_edu
CHECKPOINTS=$WORK/checkpoints
[ -f "$CONFIG" ] || { echo "run.sh: no run config $CONFIG (SIZE=45m|180m, MODEL=kla|hybrid)" >&2; exit 2; }

tokenizer() {  # nanochat-style byte-level BPE from a seeded sample of every shard
    kla-train-tokenizer --input "$PARQUET" --model-type byte-bpe --pattern nanochat --vocab-size "$VOCAB" \
        --sample-bytes-per-shard "$TOKENIZER_SAMPLE" --seed 0 --output-prefix "${TOKENIZER%.tiktoken}" --overwrite
}

preprocess() {  # one dataset per shard (a rerun after a kill skips finished shards), then merged
    if [ -f "${DATASET}_text_document.idx" ]; then
        echo "preprocess: ${DATASET}_text_document exists; delete it to build it again"; return 0
    fi
    kla-preprocess --input "$PARQUET" --tokenizer "$TOKENIZER" --output-prefix "$DATASET" \
        --workers "$WORKERS" --shard-outputs --merge --no-progress
}

train() {
    # shellcheck disable=SC2086  # LAUNCH and TRAIN_ARGS are word lists on purpose
    $LAUNCH --config "$CONFIG" --set "run_name=fineweb_edu_${MODEL}_${SIZE}" \
        --set "data.blend=[${DATASET}_text_document]" --set "data.tokenizer=$TOKENIZER" \
        --set "checkpoint.dir=$CHECKPOINTS" $TRAIN_ARGS
}

convert() {
    kla-convert megatron-to-hf "$CHECKPOINTS" "$WORK/hf" --tokenizer "$TOKENIZER" --verify
}

evaluate() {
    # shellcheck disable=SC2086  # EVAL_ARGS is a word list on purpose
    kla-eval "$WORK/hf" --tasks "$TASKS" --output "$WORK/scores" $EVAL_ARGS
}

stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(tokenizer preprocess train convert evaluate)
for stage in "${stages[@]}"; do
    case $stage in
        tokenizer|preprocess|train|convert|evaluate) echo "== $stage"; "$stage" ;;
        *) echo "run.sh: unknown stage '$stage' (tokenizer, preprocess, train, convert, evaluate)" >&2; exit 2 ;;
    esac
done
