"""Exporting trained checkpoints as Hugging Face model directories (`distill export CKPT OUT`)."""
