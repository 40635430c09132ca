"""Training data: tokenising the four dataset formats, packing and padding batches, demo sets."""
