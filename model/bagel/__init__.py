"""The BAGEL-7B-MoT / Scone model family: released checkpoints loaded strictly, the same code at toy size.

config.py (architectures, presets), qwen2_mot.py (MoT language model), siglip.py (ViT), autoencoder.py (FLUX AE),
packing.py (sequence layout and attention mask), model.py (the unified model), release.py (directory IO),
parity.py / inspect.py (the `scone model` commands).
"""
