"""Keep third-party chatter out of normal runs (``--verbose`` shows it again).

transformers prints a torchvision fallback notice and weight-loading /
shard-writing progress bars on first use; none of it is actionable for an
apet user, and apet has its own progress bars. Environment variables are
used (not the libraries' APIs) so a command that never imports transformers
does not pay for importing it; values the user set are respected.
"""

from __future__ import annotations

import os

QUIET_ENVIRONMENT = {
    "TRANSFORMERS_VERBOSITY": "error",  # transformers' logger: no notices or warnings, errors only
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # the loading/writing bars of transformers and huggingface_hub
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}


def quiet_third_party() -> None:
    for key, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
