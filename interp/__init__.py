"""Chain-of-thought interpretability for every family: capture (named activations and patches), lens (logit and
tuned lens), patching (activation-patching sweeps), probes (linear probes with control tasks), targets (the
reasoning tasks' ground-truth intermediates at their positions), faithfulness (early answering, mistakes,
filler, monitorability), suite (`altbench probe`), notebooks/."""
