"""Base models: the built-in tiny Llama, resolving model references to local folders, loading."""
