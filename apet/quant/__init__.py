"""Weight-only INT8 / INT4 quantization of the LLM graph (see :mod:`apet.quant.spec`). Torch-free at import."""
