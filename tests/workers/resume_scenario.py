"""The model, layouts and growth of the resume tests, shared by the worker and the tests."""

from megatron_recycle.plan import Architecture, DepthGrowth, GrowthPlan, WidthGrowth

BASE_ITERS, GROWN_ITERS = "3", "5"
MODEL = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
         "--ffn-hidden-size", "64", "--num-experts", "4", "--moe-ffn-hidden-size", "32",
         "--moe-router-topk", "2", "--seq-length", "32", "--micro-batch-size", "2",
         "--global-batch-size", "8", "--lr-warmup-iters", "1", "--lr-decay-iters", "10",
         "--eval-samples", "16", "--eval-interval", "1", "--corpus-bytes", "200000"]
EP2 = ["--expert-model-parallel-size", "2"]
PP2 = ["--pipeline-model-parallel-size", "2"]
DP2: list = []  # two data-parallel replicas
NOISE_ALPHA, SEED = 0.01, 7
GROW = ["--grow-depth", "2", "--grow-experts", "2", "--grow-noise-alpha", str(NOISE_ALPHA),
        "--grow-seed", str(SEED)]
PLAN = GrowthPlan(Architecture(num_layers=2, num_experts=4, topk=2), DepthGrowth(2),
                  WidthGrowth(2, noise_alpha=NOISE_ALPHA, seed=SEED))
