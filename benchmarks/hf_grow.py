"""Hugging Face checkpoints: exactness per family and memory of `megatron-recycle grow`.

    python benchmarks/hf_grow.py [--families qwen3_moe olmoe ...] [--size-mb 400 --batch-mb 64]

1. For each family, a tiny random model built by transformers from a config (as in
   tests/test_hf.py) is grown offline with width x2 at alpha 0 (top-k scaled) and with depth
   x2 (zero-init copies) plus width x2, loaded with AutoModelForCausalLM.from_pretrained, and
   the largest |logit difference| to the source printed.
2. A Mixtral of about `--size-mb` MB (fp32, random) is grown depth x2 and experts x2 at alpha
   0.01 with `--batch-size-mb` `--batch-mb`; the command's wall time and peak RSS are printed
   next to the checkpoint sizes (memory should follow the batch, not the model).
Writes JSON (default benchmarks/results/hf_grow.json).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

import test_hf  # noqa: E402  (the tests' model builder: one definition of the tiny families)

from megatron_recycle.hf.grow import grow  # noqa: E402
from megatron_recycle.options import Growth  # noqa: E402
from megatron_recycle.plan import DepthGrowth, WidthGrowth  # noqa: E402


def exactness(families, root: Path) -> dict:
    out = {}
    for model_type in families:
        src = root / model_type
        want = test_hf.build(model_type, src)
        width = WidthGrowth(factor=2, noise_alpha=0.0,
                            placement="interleave" if model_type in test_hf.GROUPED else "append")
        row = {}
        for name, growth in (("width x2, alpha 0", Growth(width=width)),
                             ("depth x2 zero-init + width x2", Growth(depth=DepthGrowth(factor=2, zero_copy_outputs=True),
                                                                      width=width))):
            dst = root / f"{model_type}-{len(row)}"
            grow(src, dst, growth, log=lambda s: None)
            row[name] = (test_hf.load_logits(dst) - want).abs().max().item()
        out[model_type] = row
        print(model_type, row, flush=True)
    return out


def memory(root: Path, size_mb: float, batch_mb: float) -> dict:
    import torch
    import transformers

    hidden = 256
    per_layer = 8 * 3 * hidden * 4 * hidden * 4 + 4 * hidden * hidden * 4  # experts + attention, fp32
    layers = max(1, round(size_mb * 2**20 / per_layer))
    config = transformers.MixtralConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=4 * hidden,
                                        num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
                                        num_local_experts=8, num_experts_per_tok=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(root / "big", max_shard_size="100MB")
    del model
    cmd = [sys.executable, "-m", "megatron_recycle.cli", "grow", "--load", str(root / "big"), "--save",
           str(root / "big-grown"), "--grow-depth", "2", "--grow-experts", "2", "--batch-size-mb", str(batch_mb)]
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True,
                          cwd=HERE.parent, env={"PYTHONPATH": str(HERE.parent), "PATH": "/usr/bin:/bin"})
    seconds = time.perf_counter() - start
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    size = lambda p: sum(f.stat().st_size for f in p.glob("*.safetensors"))  # noqa: E731
    row = {"source_mb": size(root / "big") / 2**20, "grown_mb": size(root / "big-grown") / 2**20,
           "batch_mb": batch_mb, "seconds": seconds,
           "peak_rss_mb": int(proc.stderr.strip().splitlines()[-1]) / 1024}
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="*", default=list(test_hf.FAMILIES))
    parser.add_argument("--size-mb", type=float, default=400)
    parser.add_argument("--batch-mb", type=float, default=64)
    parser.add_argument("--out", default=str(HERE / "results" / "hf_grow.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {"exactness": exactness(args.families, Path(tmp)),
                   "memory": memory(Path(tmp), args.size_mb, args.batch_mb)}
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
