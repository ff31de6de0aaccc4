"""The method itself, without Ray or models: the constitution, the prompts of each step, the
RLAIF labeler and the label, eval and RL math. Hand-computable and unit-tested; everything
above imports it, it imports only ``config``."""
