"""The IP-Adapter engine: checkpoints, variants, projection, attention, encoding and the backends.

Nothing here imports ``nodes`` or ``runtime``; ComfyUI is imported only lazily, inside
``core/backends/comfy.py`` and the ComfyUI provider of ``core/folders.py``.
"""
