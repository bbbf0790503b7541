"""``apet triton``: a Triton Inference Server model repository built from an artifact (docs/triton.md).

Past one process on one device, deployments scale with Triton (instance groups, several GPUs, KServe,
Jetson fleets). apet writes the repository; Triton serves it: the vision graph as its own model, batched and
scaled apart from decoding, and the generation model (Python backend) running apet's own runtime, which calls the
vision model through BLS. Torch-free: the modules here run inside Triton's Python stub with ``pip install apet``.
"""
