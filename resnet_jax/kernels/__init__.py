"""Hand-picked CPU kernels that XLA lacks (optional; the models fall back to XLA without them)."""
