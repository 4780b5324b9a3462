"""Relax passes of bmvcc. `pipeline.py` lists them in the order they run."""
