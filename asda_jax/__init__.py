"""asda-jax: ASDA (audio spectrogram differential attention) in JAX/Flax."""
