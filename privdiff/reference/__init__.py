"""The small reference model: procedural data, the model, its training script and the style score."""
