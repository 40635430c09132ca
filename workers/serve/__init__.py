"""Serving: one shared base model per replica, tenants' LoRA adapters batched together (README.md)."""
