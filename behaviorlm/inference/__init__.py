"""The inference layer: the one engine from a saved model to scores, batch scoring and decoding on it."""
