"""Benchmarks callable from the CLI (`linearize bench ...`): plain functions with keyword arguments."""
