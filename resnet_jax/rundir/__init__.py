"""What a run directory holds, and the one reader/writer of each of its files.

A run directory is self-contained: its config, dataset spec (name, class names, image shape),
normalisation statistics, metrics and checkpoints are enough to use its model without the
training data.
"""
