"""The values each STAR-DSS setting takes: the configuration's constants (`STARDSSConfig`, the Axolotl plugin's keys,
the command line's flags). A module that imports nothing, so scoring and `star-dss --help` read them without loading
TRL (whose import pulls in PEFT and bitsandbytes)."""

SHAPINGS = ("star_dss", "deep_token", "rejection_sampling", "sft")
SCORED_SHAPINGS = ("star_dss", "rejection_sampling")  # read the STAR scores
REFERENCE_SHAPINGS = ("star_dss", "deep_token")  # pull toward pi_ref (`star_loss`); the others train plain CE
KL_ESTIMATORS = ("k1", "k2", "k3", "full")  # docs/method.md, "The loss and the reference"
UNITS = (
    "token",
    "word",
)  # what `star_chunk_size` counts (docs/method.md, "STAR: a safety score for every prefix of a response")
# How Qwen3Guard's third class counts: its "strict" and "loose" modes (docs/method.md, "STAR: a safety score for every prefix of a response").
CONTROVERSIAL = ("unsafe", "safe")
# What the trainers do with content that holds the policy's special-token strings (docs/method.md, "Adversarial data: the threat model is the uploader").
CONTENT_SPECIAL_TOKENS = ("refuse", "drop", "keep")
# The guard families scoring reads by name (`guardrail_family`, `--family`; `scoring.families` defines each).
FAMILIES = (
    "llama_guard",
    "llama_guard_4",
    "granite_guardian",
    "granite_guardian_3_3",
    "qwen3guard_gen",
    "shieldgemma",
    "wildguard",
    "qwen3guard_stream",
)
# How a guard scores the prefixes: one forward over their shared prefix, or one per prefix (docs/method.md, "The
# scoring engine"); the same scores.
SCORING_METHODS = ("fast", "naive")
DTYPES = ("auto", "bfloat16", "float16", "float32")  # what `from_pretrained(dtype=...)` takes by name
# The toy-world demo's own values, here so `star-dss demo --help` states them without loading the demo.
DEMO_POLICIES = ("toy", "smollm2")
DEMO_GUARDS = ("learned", "rule")
# Which labels the guard-noise ablation flips: any (both), or unsafe ones only, taught as safe.
DEMO_NOISE_SIDES = ("both", "unsafe")
# `star-dss demo`'s time (README Quickstart), estimated from the CPU time of loaded runs (README, "The demo": Time).
DEMO_TIME = "at most about 3 minutes on 2 idle CPU cores"
