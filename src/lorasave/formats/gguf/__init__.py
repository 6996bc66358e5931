"""formats/gguf"""
