"""Image helpers stages use: decoding once per batch, at the size a stage needs (no stages here)."""
