"""The training layer: the engine both stages share, the training command line, builders and samplers."""
