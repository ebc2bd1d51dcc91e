"""Scripts that run countclip-jax on Cloud TPU VM slices; see launch/README.md."""
