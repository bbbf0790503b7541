"""Torch pieces several families share: the CLIP tower and its vision graph (clip_tower.py), the
``Llava*ForConditionalGeneration`` adapter base (llava_base.py), the Hugging Face checkpoint adapter (hf_model.py),
the tiny-checkpoint machinery (tiny.py) and full-size configs (shapes.py)."""
