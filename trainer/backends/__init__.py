"""Training backends and the batch type they consume."""
