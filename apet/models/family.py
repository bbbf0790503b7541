"""The seam between generic machinery and model families (docs/architecture.md).

A family is one registered package under :mod:`apet.models` that owns everything that differs
between vision-language models:

* **runtime half** (:class:`Processor`, torch-free): media -> the vision graph's inputs, and after
  the vision graph ran, prompts + kept indices -> the LLM's prefill :class:`Layout` (token ids,
  which rows of the visual embeddings go where, positions, the stage-2 span), plus positions
  for decode steps;
* **graph half** (:class:`VisionStages`, torch): the vision graph ``features -> ApET -> finish``
  with its input names, dynamic axes and example inputs, and where compression sits;
* **facts** (:class:`Family`): names and aliases, the paper's placement at stage 1, whether a
  second stage exists, how many visual tokens a request can need, the vision profile dims, and the
  ``apet-export`` options this family takes (:class:`FamilyOption`, each with the family's own default): the
  CLI builds its family flags and its ``--model`` help from the registry.

Export, engines, runtime, bench and eval ask the family named in the manifest and never assume
CLIP pixels, one image span or 1-D positions. Adding a family = one package + its tests.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Sequence

import numpy as np

from apet.errors import UsageError
from apet.extras import import_extra

if TYPE_CHECKING:  # torch-free at run time
    from apet.manifest import Manifest
    from apet.modeling.adapter import VisionLanguageAdapter


@dataclass
class VisionInputs:
    """What the vision graph takes for one batch of requests, plus the family's bookkeeping.

    ``arrays`` is one run of the vision graph. A family whose media cannot share one run (images of
    different sizes in a dynamic-resolution model) lists every run in ``runs`` (``arrays`` is then
    the first); backends run them in order and concatenate the outputs: rows of the visual
    embeddings follow the runs, and ``keep_index`` becomes one array per medium.
    """

    arrays: dict[str, np.ndarray]
    items: int  # requests (images / videos) in the batch
    meta: Any = None
    runs: list[dict[str, np.ndarray]] | None = None

    def all_runs(self) -> list[dict[str, np.ndarray]]:
        return self.runs if self.runs else [self.arrays]


@dataclass
class Layout:
    """One prefill: left-padded prompts with visual slots, and where each visual row goes.

    ``visual_rows[b, t]`` is a row of the vision graph's embeddings flattened to [rows, H] (-1 for a
    text token); ``positions`` is [B, T] or [3, B, T] (M-RoPE); ``image_start[b]`` is where the
    stage-2 span (the first K1 visual tokens of the row) starts.
    """

    token_ids: np.ndarray
    attention_mask: np.ndarray
    visual_rows: np.ndarray
    positions: np.ndarray
    image_start: np.ndarray
    visual_tokens: list[int]
    prompt_lengths: list[int]
    state: dict[str, Any] = field(default_factory=dict)  # what decode_positions needs

    @property
    def batch(self) -> int:
        return int(self.token_ids.shape[0])


def positions_from_mask(mask: np.ndarray) -> np.ndarray:
    """Hugging Face's 1-D convention for left padding: running count of real tokens minus one; pads get 1."""
    positions = np.cumsum(mask, axis=-1) - 1
    return np.where(mask == 0, 1, positions).astype(np.int64)


class Processor(ABC):
    """Runtime half of a family for one artifact (torch-free)."""

    # whether :meth:`layout` reads the kept indices' values, not only how many rows each image keeps: where it
    # does not, a backend may lay the prompt out before the vision graph runs (ONNX Runtime's ``first-token``)
    layout_reads_kept_values: bool = True

    def __init__(self, artifact_dir: Path | None, manifest: "Manifest") -> None:
        self.artifact_dir = None if artifact_dir is None else Path(artifact_dir)
        self.manifest = manifest

    @abstractmethod
    def vision_inputs(self, media: Sequence[Any]) -> VisionInputs:
        """Load and preprocess one medium per request (InputError for unreadable data)."""

    @abstractmethod
    def layout(self, prompts: Sequence[str], inputs: VisionInputs, keep_index: np.ndarray,
               max_new_tokens: int) -> Layout:
        """The prefill for ``prompts`` once the vision graph returned ``keep_index``; InputError when a
        prompt plus ``max_new_tokens`` does not fit the artifact's context."""

    def check_prompts(self, prompts: Sequence[str], max_new_tokens: int) -> int:
        """Cheap checks before any compute (empty prompt, context overflow at the largest visual count);
        returns the longest prefill the prompts can need (exact, or an upper bound where the visual count
        depends on the media), which the backend checks against its engines' limits before any work."""
        return 0

    def item_keep_index(self, inputs: VisionInputs, keep_index: np.ndarray) -> list[np.ndarray]:
        """The vision graph's kept indices split per request (one row per image by default; a multi-view
        family returns [views, K1] per image)."""
        return list(keep_index[:inputs.items])

    def decode_positions(self, layout: Layout, attention_mask: np.ndarray) -> np.ndarray:
        """Positions of the next token, [B, 1] (or [3, B, 1]); ``attention_mask`` already includes it."""
        return positions_from_mask(attention_mask)[:, -1:]


@dataclass(frozen=True)
class FamilyOption:
    """One ``apet-export`` option a family declares (options that belong to a family come from it).

    ``apet-export`` adds every declared flag once (families may declare the same flag with different defaults:
    the default is the family's, applied when the user did not pass the flag) and hands what the user passed to
    the export as ``ExportConfig.family_options`` {name: value}; the family checks the values before any model
    loads (:meth:`Family.resolve_export_options`) and applies them to the loaded model
    (:meth:`Family.apply_export_options`: the adapter's ``set_<name>`` method by default). Generic code never
    learns what an option means.
    """

    flag: str  # "--pixel-range"
    help: str  # what the flag does (the CLI adds each declaring family's ``detail``)
    default: str | None = None  # the family's value when the flag is absent; None: the checkpoint's own setting
    choices: tuple[str, ...] = ()  # a closed set of values (argparse checks them); empty: ``parse`` decides
    parse: Callable[[str], Any] | None = None  # value -> normalised value; UsageError naming the flag and the fix
    metavar: str | None = None
    kind: Callable[[str], Any] = str  # the value's type (int for counts): argparse's ``type``
    detail: str | None = None  # this family's part of the help (its values, its default); None: "default X"

    @property
    def name(self) -> str:
        """The key in ``ExportConfig.family_options`` (the flag without its dashes)."""
        return self.flag.lstrip("-")

    @property
    def dest(self) -> str:
        """The argparse destination of the flag (and the adapter's ``set_<dest>``)."""
        return self.name.replace("-", "_")

    def describe(self) -> str:
        """This family's part of the flag's help."""
        return self.detail or f"default {self.default}"

    def check(self, value: Any, family: str) -> Any:
        """The normalised value, or UsageError naming the flag, the value and what would work."""
        if self.kind is not str:
            try:
                value = self.kind(value)
            except (TypeError, ValueError):
                raise UsageError(f"{self.flag} {value!r} is not a valid {self.kind.__name__}",
                                 f"pass {self.flag} as a {self.kind.__name__}, or drop it") from None
        if self.choices and value not in self.choices:
            raise UsageError(f"{self.flag} {value!r} is not available for {family}",
                             f"use one of {', '.join(self.choices)}, or drop {self.flag} ({family} default: "
                             f"{self.default})")
        return self.parse(value) if self.parse is not None else value


# (features [B', N, D]) -> kept tokens and their positions; ApET's apet.compression.selector(config) or an eval rule
Selector = Callable[[Any], Any]


class Family(ABC):
    """Facts and factories of one model family; one instance is registered per family."""

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]  # config.json model_type values this family loads
    aliases: ClassVar[dict[str, str]] = {}  # short --model names -> hub ids
    shapes: ClassVar[tuple[str, ...]] = ()  # --model names for random weights at real sizes
    tiny: ClassVar[str | None] = None  # --model name of the seeded tiny checkpoint
    media: ClassVar[str] = "image"  # "image" or "video"
    stage1_placement: ClassVar[str] = "mask"  # the paper's basis placement at the vision output
    max_stages: ClassVar[int] = 2
    # N varies per image (dynamic resolution): --ratio keeps int(r·N) of each image, --tokens a fixed K
    # (apet.contracts.plan); spec.n_tokens is then the most tokens one image can have
    dynamic_tokens: ClassVar[bool] = False
    export_options: ClassVar[tuple[FamilyOption, ...]] = ()  # apet-export flags this family takes, in apply order

    # -- export options (checked before the model loads, applied after) ------------------------------
    def resolve_export_options(self, given: Mapping[str, str]) -> dict[str, str]:
        """Every declared option's value: the user's (checked by the option) or the family's default (options
        whose default is None are left out). A flag this family does not declare is a UsageError naming it."""
        given = {name: value for name, value in given.items() if value is not None}
        declared = {option.name: option for option in self.export_options}
        for name in given:
            if name not in declared:
                own = ", ".join(option.flag for option in self.export_options)
                raise UsageError(f"--{name} is not available for the {self.name} family",
                                 f"drop --{name} ({self.name} takes " + (f"{own} of the family options)" if own
                                                                          else "no family options)"))
        resolved = {}
        for name, option in declared.items():
            value = given.get(name, option.default)
            if value is not None:
                resolved[name] = option.check(value if option.kind is not str else str(value), self.name)
        return resolved

    def apply_export_options(self, adapter: "VisionLanguageAdapter", options: Mapping[str, Any]) -> None:
        """Apply :meth:`resolve_export_options`' values to a loaded adapter, in the order the family declares
        them, before the compression plan is made (an option may change the visual token count): each through the
        adapter's ``set_<name>`` method (:meth:`VisionLanguageAdapter.customize`)."""
        order = [option.name for option in self.export_options]
        adapter.customize(**{name.replace("-", "_"): options[name]
                             for name in sorted(options, key=lambda n: order.index(n) if n in order else len(order))})

    # -- torch half: apet.adapters.<package>, imported on demand (the device never needs it) ----------
    def torch_half(self) -> Any:
        """The family's torch half (:class:`apet.adapters.shared.half.TorchHalf`): ``HALF`` of the package of the
        same name under :mod:`apet.adapters`. Imported by name so that nothing on the runtime side depends on
        torch; without the export extra this is a :class:`MissingExtraError` naming it."""
        package = type(self).__module__.rsplit(".", 1)[0].replace("apet.models.", "apet.adapters.", 1)
        return import_extra(package, extra="export", purpose=f"the {self.name} family's torch half").HALF

    def load(self, path: Path, *, dtype: Any = None, device: str = "cpu") -> "VisionLanguageAdapter":
        """Load a local checkpoint directory (safetensors only; ``dtype`` None is float32)."""
        return self.torch_half().load(path, dtype=dtype, device=device)

    def random_init(self, shape_name: str, *, dtype: Any = None, device: str = "cpu") -> "VisionLanguageAdapter":
        """Random weights at the real sizes of ``shape_name`` (one of :attr:`shapes`)."""
        return self.torch_half().random_init(shape_name, dtype=dtype, device=device)

    def tiny_checkpoint(self) -> Path:
        """The cached seeded tiny checkpoint, created on first use."""
        return self.torch_half().tiny_checkpoint()

    def vision_stages(self, adapter: "VisionLanguageAdapter", select: Selector) -> Any:
        """The vision graph as a :class:`apet.modeling.vision.VisionStages` module."""
        return self.torch_half().vision_stages(adapter, select)

    def vision_flops_shape(self, adapter: "VisionLanguageAdapter", **options: Any) -> Any:
        """The ViT's shape for the benchmarks' FLOP and byte counts (:class:`apet.contracts.specs.VisionShape`)."""
        half = self.torch_half()
        if half.flops_shape is None:
            raise NotImplementedError(f"{self.name} declares no vision FLOP model")
        return half.flops_shape(adapter, **options)

    def hf_generate_inputs(self, inputs: VisionInputs, layout: Layout) -> dict[str, np.ndarray]:
        """Keyword arguments besides ids and mask that the Hugging Face model's ``generate`` takes for these
        media (the plain-HF baseline of the benchmarks and the parity tests)."""
        return dict(inputs.arrays)

    # -- facts (manifest only, torch-free) ---------------------------------------------------------
    @abstractmethod
    def processor(self, artifact_dir: Path | None, manifest: "Manifest") -> Processor: ...

    @abstractmethod
    def max_visual_tokens(self, manifest: "Manifest") -> int:
        """Visual tokens one request can need at the LLM input (sizes profiles and context checks)."""

    def typical_visual_tokens(self, manifest: "Manifest") -> int:
        return self.max_visual_tokens(manifest)

    def visual_summary(self, manifest: "Manifest") -> str:
        """One line for ``apet inspect``: the visual tokens a request puts in front of the LLM."""
        return f"{self.max_visual_tokens(manifest)} per image"

    def preprocessing_summary(self, manifest: "Manifest") -> str | None:
        """One line for ``apet inspect`` on a preprocessing choice the artifact fixed (an export option's
        resolved value, e.g. a pixel range), or None when there is nothing to say."""
        return None

    def profiling_vision_inputs(self, manifest: "Manifest") -> dict[str, np.ndarray]:
        """Integer vision inputs of a typical request for trtexec's profiling run (their shapes fix the run's
        dims; trtexec would fill indices with random values otherwise); empty when every input is pixels."""
        return {}

    @abstractmethod
    def vision_dims(self, manifest: "Manifest", max_batch: int) -> dict[str, tuple[int, int, int]]:
        """(min, opt, max) of every symbolic dim of the vision graph's inputs, for engine profiles."""

    def media_of(self, manifest: "Manifest") -> str:
        """What ``manifest``'s artifact reads ("image" or "video"): :attr:`media` unless the family exports
        artifacts for several media."""
        return self.media

    def vision_passes(self, manifest: "Manifest") -> int:
        """Vision-tower passes per request (frames of a video; 1 for one image): the benchmarks' FLOP model."""
        return 1

    def synthetic_media(self, manifest: "Manifest", rng: np.random.Generator, size: tuple[int, int]) -> Any:
        """One random medium of ``size`` (width, height) as :meth:`Processor.vision_inputs` takes it
        (benchmarks); an RGB image unless the family reads something else."""
        from PIL import Image

        width, height = size
        return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))

    def text_before_media(self, manifest: "Manifest", tokenizer_dir: Path | None) -> int:
        """Prompt tokens before the first visual token (trtexec inputs, synthetic benchmark prompts): counted
        with the tokenizer in ``tokenizer_dir``, estimated without one."""
        return self.processor(tokenizer_dir, manifest).encoder.text_before_media()
