"""Hash helpers stages use: the exact near-duplicate search over 64-bit pHashes (near) (no stages here)."""
