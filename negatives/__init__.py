"""Hard negatives. text/: negative captions of SugarCrepe's seven kinds (rules, checks, plausibility scoring; the
negatives_text stage and the negatives flow use it; it imports no stage). images: counterfactual images of a finished
build's pairs, the editors' candidates validated by a scorer; editors: flip, recolor, diffusion and the registry the
demo's render editor joins."""
