"""Megatron-Bridge integration (an adapter beside `megatron_lm/`; growth never imports it).

- `checkpoint`: a Bridge checkpoint's files beside the weights (run_config.yaml, train state,
  tokenizer), grown with it by offline growth and checked by `verify`.
"""
