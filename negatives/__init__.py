"""Hard negatives: counterfactual images of a finished build's pairs (images: the editors' candidates validated by a
scorer; editors: flip, recolor, diffusion and the registry the demo's render editor joins). The negatives_text stage
makes the negative captions."""
