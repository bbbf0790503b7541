"""apet: ApET visual-token compression inside ONNX graphs and TensorRT engines for vision-language models."""

__version__ = "0.1.0"
