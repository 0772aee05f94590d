"""Image helpers: decoding, editors that make counterfactual images, and their validation (no stages here)."""
