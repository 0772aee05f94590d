"""Caption text helpers of the stages: word frequency lists and the faithfulness gate (no stages here)."""
