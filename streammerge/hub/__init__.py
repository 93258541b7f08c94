"""Hugging Face Hub model references: `org/name[@revision]` resolved through the hub's cache, checked
from headers read by HTTP range requests, and only the files a plan reads downloaded.

`huggingface_hub` (the `hub` extra) is imported only when a config names a hub repository.
"""
