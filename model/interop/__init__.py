"""Interop: pretrained transformers / GGUF models into the GPT and the ViT (hf_import.py, hf_folder.py,
gguf_file.py, hf_vit.py), and a sink fix retrofitted onto an import (retrofit.py). The core in model/ never
imports this package."""
