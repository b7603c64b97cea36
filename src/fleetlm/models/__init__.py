"""Model families, weight loading (HF folder, GGUF, hub) and the registry of embedded defaults."""
