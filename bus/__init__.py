"""A small, dependable ZeroMQ messaging layer. Knows nothing of radiotherapy."""
