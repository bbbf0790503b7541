"""Model families. Importing this package registers the built-in ones (each import is torch-free)."""

import apet.models.llava  # noqa: F401
import apet.models.llava_next  # noqa: F401
import apet.models.qwen2_5_vl  # noqa: F401
import apet.models.video_llava  # noqa: F401
