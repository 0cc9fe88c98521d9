"""Benchmarks of dplis against non-private training and Opacus (``python -m bench``)."""
