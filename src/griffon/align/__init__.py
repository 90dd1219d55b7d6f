"""Post-training: the objectives that align a model with preferences or rewards (DPO, QRPO)."""
