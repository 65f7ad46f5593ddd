"""Checkpoint I/O: what a checkpoint holds (`checkpoint`), reading boxes of its tensors
(`reader`), and writing a new one atomically (`writer`). Nothing here executes checkpoint
content: `.metadata` is unpickled with an allow-list (`safe_pickle`), the common state and
sharded objects with `torch.load(weights_only=True)`."""
