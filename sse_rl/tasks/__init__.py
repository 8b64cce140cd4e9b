"""Synthetic, verifiable tasks: generated prompts with known answers, their tokenizers and rewards."""
