"""Caption text helpers: grammar, lexicon and the faithfulness gate (no stages here)."""
