"""Pieces several families share (CLIP preprocessing, Hugging Face checkpoint files)."""
