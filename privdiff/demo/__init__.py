"""The demos `make demo` runs (``python -m privdiff.demo``): top of the tree, they may import anything in privdiff."""
