"""The tiny InsightFace packs for the tests: re-exported from ``ipadapter_nodes.runtime.tiny_faces``.

The builder lives in the package because ``ipadapter run --model-map tiny`` needs it at run time; this module
keeps the tests' ``from tiny_faces import ...`` working.
"""
from ipadapter_nodes.runtime.tiny_faces import (  # noqa: F401 - re-exports
    DEFAULT_ROOT,
    EMBED_DIM,
    FACE_RGB,
    FACE_SCORE,
    FACE_TOLERANCE,
    KEYPOINTS,
    PACK_FILES,
    STRIDES,
    TinyDetector,
    TinyRecognizer,
    blank_image,
    detector_onnx,
    ensure_tiny_faces,
    face_image,
    recognizer_onnx,
)

__all__ = ["DEFAULT_ROOT", "EMBED_DIM", "FACE_RGB", "FACE_SCORE", "FACE_TOLERANCE", "KEYPOINTS", "PACK_FILES",
           "STRIDES", "TinyDetector", "TinyRecognizer", "blank_image", "detector_onnx", "ensure_tiny_faces",
           "face_image", "recognizer_onnx"]
