"""LoRA Fleet Python SDK."""
