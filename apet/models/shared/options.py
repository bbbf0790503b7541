"""Export options several families declare (torch-free): each family states its own values and default in the
``detail`` the CLI's help shows next to the flag (:class:`apet.models.family.FamilyOption`)."""

from __future__ import annotations

from apet.models.family import FamilyOption

IMAGE_FITS = ("pad", "crop")  # CLIP preprocessing: pad to a square, or centre-crop


def prompt_template_option(detail: str) -> FamilyOption:
    """``--prompt-template NAME``: one of the family's named templates (its adapter checks the name: the names
    may depend on another option, e.g. the medium)."""
    return FamilyOption("--prompt-template", "named prompt template", detail=detail)


def image_fit_option(detail: str) -> FamilyOption:
    """``--image-fit pad|crop`` of CLIP-preprocessed families."""
    return FamilyOption("--image-fit", "pad: pad to a square with the mean colour, then resize; crop: resize the "
                        "shortest edge and centre-crop (Hugging Face's processor)", choices=IMAGE_FITS, detail=detail)
