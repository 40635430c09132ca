"""Operations on published adapters: merge-and-export (export.py) and weighted blends (blend.py)."""
