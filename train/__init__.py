"""The one training loop every family shares: config, data, step, mesh, checkpoints, metrics and the CLI."""
