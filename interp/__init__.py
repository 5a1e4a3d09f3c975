"""Chain-of-thought interpretability: capture, probes, lenses and faithfulness tests (under construction)."""
