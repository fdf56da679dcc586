"""Supervised fine-tuning: the pure step, data pipeline, checkpoints and the SFT trainer."""
