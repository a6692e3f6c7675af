"""Backends hook the engine's Applications into a UNet.

``diffusers`` patches a diffusers ``UNet2DConditionModel`` for the duration of a sampling call;
``comfy`` (imported lazily, only inside ComfyUI) registers attn2 replace patches on a ModelPatcher.
"""
