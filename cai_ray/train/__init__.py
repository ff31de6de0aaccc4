"""Training on Ray Train with DeepSpeed ZeRO: SFT (preference model and DPO to follow)."""
