"""Fine-tuning: the plain torch/PEFT train loop, its reporters, and the thin Ray Train wrapper."""
