"""``fleetlm tune``: raw rows -> cleaned, anonymised, expanded, filtered -> LoRA -> evaluated -> published."""
