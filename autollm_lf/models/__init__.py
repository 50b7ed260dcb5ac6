"""Where the base model comes from and what shape it has: a GGUF file converted once into a Hugging Face folder
(gguf.py; where the file comes from in gguf_source.py, its tokenizer rebuilt in gguf_tokenizer.py), a tiny Llama built
locally (tiny.py), and the shapes a base has before it is loaded (shape.py: config.json, or a GGUF's header).
"""
