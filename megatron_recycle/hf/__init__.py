"""Hugging Face MoE checkpoints: the family tables (`families`), the Megatron-equivalent view
of their tensors (`view`), offline growth (`grow`), verify / inspect / plan (`check`) and the
commands (`commands`). Reading and writing safetensors is `io/hf.py`."""
