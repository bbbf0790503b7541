"""Weight-only INT8 / INT4 quantization of the LLM graph (see :mod:`apet.contracts.weights`). Torch-free at import."""
