"""Pieces several families share: the CLIP recipe (clip.py, torch-free), the CLIP tower and its vision graph
(clip_tower.py), the ``Llava*ForConditionalGeneration`` adapter base (llava_base.py), Hugging Face checkpoint
files (hf_files.py) and the tiny-checkpoint machinery (tiny.py)."""
