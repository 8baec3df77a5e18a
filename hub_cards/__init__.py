"""Model-card templates shipped with phantom-hf (read with `importlib.resources`)."""
