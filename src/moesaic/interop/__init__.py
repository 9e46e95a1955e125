"""Interoperability with other formats: Hugging Face transformers checkpoints (:mod:`moesaic.interop.hf`)."""
