#!/bin/bash
# Grow on one node (GPUS GPUs, default 8) with Megatron-LM: a base MoE checkpoint in $LOAD grows
# by --grow-depth 2 --grow-experts 2 into $SAVE and keeps training. Re-running the same command
# resumes $SAVE (requeue-safe). Pass the base run's model arguments after the script name:
#
#   LOAD=ckpt/base SAVE=ckpt/grown MEGATRON_LM=~/Megatron-LM scripts/grow_single_node.sh \
#       --num-layers 12 --hidden-size 1024 --num-attention-heads 16 --num-experts 8 ...
set -euo pipefail
: "${MEGATRON_LM:?set MEGATRON_LM to your Megatron-LM checkout}"
: "${LOAD:?set LOAD to the base checkpoint}" "${SAVE:?set SAVE to the grown checkpoint dir}"
GPUS=${GPUS:-8}
export CUDA_DEVICE_MAX_CONNECTIONS=1

torchrun --standalone --nproc-per-node "$GPUS" -m megatron_recycle.launch "$MEGATRON_LM/pretrain_gpt.py" \
  "$@" \
  --tensor-model-parallel-size 1 --expert-model-parallel-size "${EP:-$GPUS}" --pipeline-model-parallel-size 1 \
  --micro-batch-size 1 --global-batch-size "${GBS:-256}" --train-iters "${TRAIN_ITERS:-20000}" --bf16 \
  --lr 3e-4 --min-lr 3e-4 --lr-decay-style constant \
  --use-distributed-optimizer --dist-ckpt-optim-fully-reshardable \
  --mock-data --tokenizer-type NullTokenizer --vocab-size "${VOCAB:-32000}" \
  --ckpt-format torch_dist --load "$LOAD" --save "$SAVE" --save-interval 500 --log-interval 10 \
  --grow-depth "${GROW_DEPTH:-2}" --grow-experts "${GROW_EXPERTS:-2}" --grow-optimizer "${GROW_OPTIMIZER:-copy}"
