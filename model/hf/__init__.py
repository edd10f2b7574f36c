"""rotalibi's models as Hugging Face transformers models: the self-contained modeling file the
exports ship (modeling_rotalibi.py, assembled by source.py) and the conversion (convert.py).
The only part of model/ that imports transformers."""
