"""The model, data and layouts of the tensor-parallel training test, shared by the worker and
the test. Both layouts run on 4 ranks with the same global batch and EP (which decides how
experts are initialised), so from the same init and data; TP2 also splits the experts (ETP2)."""

ITERS = 4
MODEL = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
         "--ffn-hidden-size", "64", "--num-experts", "4", "--moe-ffn-hidden-size", "32",
         "--moe-router-topk", "2", "--seq-length", "32", "--micro-batch-size", "2",
         "--global-batch-size", "8", "--lr", "1e-2", "--lr-warmup-iters", "0",
         "--train-iters", str(ITERS), "--eval-interval", str(ITERS), "--eval-samples", "8",
         "--corpus-bytes", "200000"]
REFERENCE = "tp1-ep2"
LAYOUTS = {
    REFERENCE: ["--expert-model-parallel-size", "2"],
    "tp2-ep2": ["--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2"],
}
