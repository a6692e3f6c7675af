"""Headless runtime: workflow formats, validation, executor, caching, CLI and diffusers-backed standard nodes.

Standard nodes (CheckpointLoaderSimple, KSampler, ...) are registered only here, i.e. only when running
headless; inside ComfyUI the real ones exist.
"""
