"""Domain floor: optimiser settings and the DeiT learning-rate schedule."""
