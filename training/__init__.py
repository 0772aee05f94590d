"""Contrastive training and the proxy evaluation."""
