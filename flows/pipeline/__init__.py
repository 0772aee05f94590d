"""Build steps that run as distributed operations over Ray Data."""
