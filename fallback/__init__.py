"""CPU backends (llama-cpp-python)."""
