"""Training: config, plan, buckets, data, networks, loss, optimiser, loop, resume."""
