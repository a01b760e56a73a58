"""A local text-generation service: FastAPI over a batched, XLA-compiled TensorFlow decode loop."""
