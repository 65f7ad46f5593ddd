"""Checkpoint I/O: what a checkpoint holds (`checkpoint`), reading boxes of its tensors
(`reader`), writing a new one atomically (`writer`) and the files beside the weights
(`iteration_files`). Nothing here executes checkpoint content: `.metadata` is unpickled with
an allow-list (`safe_pickle`), the common state and sharded objects with
`torch.load(weights_only=True)`."""
