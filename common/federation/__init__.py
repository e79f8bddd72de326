"""What the model owner's ServerApp and the data owners' ClientApps agree on: run configuration,
record names in Flower messages, and how tensors travel."""
