"""Where the base model comes from: a GGUF file converted once into a Hugging Face folder (gguf.py; where the file comes
from in gguf_source.py, its tokenizer in gguf_tokenizer.py), a tiny Llama built locally (tiny.py), and the shape a base has before it is loaded (shape.py).

Below every stage: training starts from the base, the merge loads it, validate and the footprint read its shape.
"""
