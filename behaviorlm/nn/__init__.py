"""The network layer: the causal transformer and its heads, and the training loop that fits it.

Nothing here reads event files; it sees token tensors only.
"""
