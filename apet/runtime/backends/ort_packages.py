"""Which ONNX Runtime packages are installed, and the fix when a CUDA run finds no CUDA provider.

``pip install apet`` brings ``onnxruntime`` (the CPU build). The CUDA build is another distribution,
``onnxruntime-gpu``, that installs the same ``onnxruntime`` module: with both installed, the files of whichever pip
installed last are the ones imported, and removing or upgrading either one (``pip install -U apet`` upgrading
``onnxruntime``) silently takes the CUDA provider away. ONNX Runtime's own instructions are to keep one of them.
"""

from __future__ import annotations

from importlib import metadata

from apet.errors import option

# the distributions on PyPI that install the `onnxruntime` module (each a build for one kind of device)
ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino",
                     "onnxruntime-qnn", "onnxruntime-training")
GPU_DISTRIBUTION = "onnxruntime-gpu"


def installed_distributions() -> dict[str, str]:
    """name -> version of every installed distribution that provides the ``onnxruntime`` module."""
    found = {}
    for name in ORT_DISTRIBUTIONS:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def no_cuda_provider(available: list[str], installed: dict[str, str]) -> tuple[str, str]:
    """(problem, fix) for a CUDA run whose ONNX Runtime lists no CUDA provider, from what is installed."""
    problem = f"ONNX Runtime has no CUDAExecutionProvider here (available: {available})"
    gpu = installed.get(GPU_DISTRIBUTION)
    others = sorted(name for name in installed if name != GPU_DISTRIBUTION)
    reinstall = ("pip uninstall -y " + " ".join(sorted(installed)) + f" && pip install {GPU_DISTRIBUTION}"
                 + (f"=={gpu}" if gpu else ""))
    keep = "; later upgrades of apet: pip install -U --no-deps apet, so pip does not bring onnxruntime back"
    cpu = option("device", "cpu")
    if gpu and others:
        return (f"{problem}: {GPU_DISTRIBUTION} {gpu} is installed beside {', '.join(others)}, which install the "
                "same onnxruntime module, and the files of the one installed last won",
                f"keep one: {reinstall}{keep}; or pass {cpu}")
    if gpu:
        return (f"{problem}, although {GPU_DISTRIBUTION} {gpu} is installed: its CUDA provider did not register",
                f"reinstall it ({reinstall}), built for this machine's CUDA; or pass {cpu}")
    return problem, (f"install the CUDA build in place of the CPU one: {reinstall}{keep} (on a Jetson: the "
                     f"onnxruntime-gpu wheel built for its JetPack); or pass {cpu}")
