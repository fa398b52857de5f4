"""Training state: items, their kinds, the state tree, optimizers, random streams."""
