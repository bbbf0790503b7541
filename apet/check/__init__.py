"""``apet check``: run one request through several backends and report, stage by stage, where they depart.

The runners and the run are NVIDIA Polygraphy's (``Comparator.run`` over ``BaseRunner`` subclasses: ONNX
Runtime through Polygraphy's ``OnnxrtRunner``, the torch and TensorRT backends through a runner over apet's own
backend); the report follows the graphs' name scopes (:mod:`apet.scopes`), adds ApET's selection and merge
margins (docs/algorithm.md) so a user can tell a near-tie from a bug, and names the first scope that departs
beyond tolerance, with a reduced ONNX of it for a bug report (README, "When the engine disagrees").
"""

from apet.check.report import CheckReport
from apet.check.run import CheckConfig, RunnerSpec, check

__all__ = ["CheckConfig", "CheckReport", "RunnerSpec", "check"]
