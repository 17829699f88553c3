"""Trainer role: torchtitan under torchrun (FSDP2), GRPO-family losses, checkpoints, weight broadcast."""
