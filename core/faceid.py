"""InsightFace for FaceID: load a model pack on a chosen ONNX Runtime provider, find and align faces.

Loading (``load_insightface``) reads ``<insightface folder>/models/<name>/*.onnx`` and never downloads:
insightface's own ``FaceAnalysis`` fetches a pack from the internet when its folder is missing, so the
folder is checked first and handed to insightface as a directory path, which it uses as is.

Analysis (``analyze_faces``) follows the IP-Adapter FaceID recipe: detection retried at decreasing
detector sizes until a face is found, one face per image, its ArcFace embedding (L2-normalised, or raw
for Portrait-unnorm) and the face aligned by its five keypoints (``norm_crop``) at the size the CLIP
side wants (224 for SD1.5, 256 for SDXL, 336 for Kolors).

insightface and onnxruntime are imported lazily, so the package imports where they are absent.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from . import folders

logger = logging.getLogger(__name__)

PROVIDERS = ("CPU", "CUDA", "ROCM", "DirectML", "OpenVINO", "CoreML")
# The widget names above are what shared workflows store; ONNX Runtime's names differ for DirectML.
ORT_PROVIDER_NAMES = {
    "CPU": "CPUExecutionProvider",
    "CUDA": "CUDAExecutionProvider",
    "ROCM": "ROCMExecutionProvider",
    "DirectML": "DmlExecutionProvider",
    "OpenVINO": "OpenVINOExecutionProvider",
    "CoreML": "CoreMLExecutionProvider",
}
# What the official packs contain; only a detector and a recognizer are needed (listed last).
MODEL_PACK_FILES = {
    "buffalo_l": (("1k3d68.onnx", "2d106det.onnx", "genderage.onnx"), ("det_10g.onnx", "w600k_r50.onnx")),
    "antelopev2": (("1k3d68.onnx", "2d106det.onnx", "genderage.onnx"), ("scrfd_10g_bnkps.onnx", "glintr100.onnx")),
}
MODEL_NAMES = tuple(MODEL_PACK_FILES)
# Detector sizes tried in turn until a face is found (the FaceID nodes of the reference pack use these).
DET_SIZES = (640, 576, 512, 448, 384, 320)
# Aligned crop per model family: the CLIP side of FaceID-Plus / Portrait encodes this crop.
CROP_SIZES = {"sd15": 224, "sdxl": 256, "kolors": 336}
NO_FACE_ACTIONS = ("error", "skip")
EMBED_DIM = 512


class InsightFaceModelNotFoundError(FileNotFoundError):
    """The InsightFace model pack folder is missing or holds no usable ONNX models."""


class FaceNotFoundError(ValueError):
    """No face was detected in an input image (at any detector size)."""


@dataclass(eq=False)
class FaceAnalyzer:
    """A loaded InsightFace pack (the INSIGHTFACE value): insightface's ``FaceAnalysis`` plus where it came from."""

    app: Any
    name: str
    model_dir: str
    provider: str                   # as requested (a PROVIDERS entry)
    ort_providers: tuple[str, ...]  # what ONNX Runtime was asked to use after any fallback

    @property
    def detector(self) -> Any:
        return self.app.det_model

    @property
    def recognizer(self) -> Any:
        return self.app.models["recognition"]


@dataclass
class FaceAnalysis:
    """Faces found in a batch of images: one row per image that had a face."""

    embeds: torch.Tensor            # [N, 512] float32: normed_embedding, or the raw embedding when normed=False
    crops: torch.Tensor             # [N, S, S, 3] IMAGE: the face aligned by its keypoints
    found: list[bool]               # per input image
    image_index: list[int]          # per row: the input image it came from
    det_sizes: list[int] = field(default_factory=list)  # per row: the detector size that found the face
    boxes: torch.Tensor | None = None                   # [N, 4] x1, y1, x2, y2 in input-image pixels


_cache: dict[tuple[str, str, str], FaceAnalyzer] = {}
_warned_providers: set[str] = set()
_lock = threading.Lock()


def clear_cache() -> None:
    """Forget loaded packs and which provider fallbacks were already reported (for tests and reloads)."""
    with _lock:
        _cache.clear()
        _warned_providers.clear()


def resolve_providers(provider: str) -> list[str]:
    """ONNX Runtime provider list for a ``PROVIDERS`` entry; unavailable ones fall back to CPU, warned once."""
    if provider not in ORT_PROVIDER_NAMES:
        raise ValueError(f"InsightFace provider '{provider}' is not known; expected one of {', '.join(PROVIDERS)}")
    import onnxruntime

    wanted = ORT_PROVIDER_NAMES[provider]
    cpu = ORT_PROVIDER_NAMES["CPU"]
    available = list(onnxruntime.get_available_providers())
    if wanted in available:
        # CPU stays listed so that operators the accelerator lacks still run.
        return [wanted] if wanted == cpu else [wanted, cpu]
    with _lock:
        first_time = provider not in _warned_providers
        _warned_providers.add(provider)
    if first_time:
        logger.warning(
            "InsightFace: provider %s (%s) is not available in this ONNX Runtime (available: %s); running on CPU. "
            "GPU providers come from a different package, e.g. onnxruntime-gpu for CUDA (extra 'gpu'); it provides "
            "the same 'onnxruntime' module, so uninstall onnxruntime before installing it.",
            provider, wanted, ", ".join(available) or "none")
    return [cpu]


def insightface_root(name: str = "buffalo_l") -> Path:
    """The ``insightface`` models folder to use: the first one holding ``models/<name>``, else the first one."""
    roots = [Path(p) for p in folders.get_folder_paths("insightface")]
    if not roots:
        raise InsightFaceModelNotFoundError("no 'insightface' models folder is configured")
    for root in roots:
        if (root / "models" / name).is_dir():
            return root
    return roots[0]


def _missing_pack_message(name: str, model_dir: Path, reason: str) -> str:
    optional, required = MODEL_PACK_FILES.get(name, ((), ()))
    if required:
        listed = ", ".join(sorted(optional + required))
        files = f"the {name} model files ({listed}; {' and '.join(required)} are required)"
    else:
        files = f"the {name} model files (a face detector and a face recognizer as .onnx files)"
    nested = model_dir / name
    hint = ""
    if nested.is_dir() and any(nested.glob("*.onnx")):
        hint = f" The files are in a nested folder {nested}/; move them up one level."
    return (f"InsightFace model pack '{name}' {reason}: put {files} in {model_dir}/.{hint} "
            "Nothing is downloaded automatically.")


def _check_model_dir(name: str, model_dir: Path) -> None:
    if not model_dir.is_dir():
        raise InsightFaceModelNotFoundError(_missing_pack_message(name, model_dir, "was not found"))
    if not any(model_dir.glob("*.onnx")):
        raise InsightFaceModelNotFoundError(_missing_pack_message(name, model_dir, "has no .onnx files"))


def load_insightface(name: str = "buffalo_l", root: str | Path | None = None, provider: str = "CPU") -> FaceAnalyzer:
    """Load InsightFace pack ``name`` from ``<root>/models/<name>/`` on ``provider``; cached per (root, name, provider).

    ``root`` defaults to the ``insightface`` models folder (see :func:`insightface_root`).  A provider that this
    ONNX Runtime lacks falls back to CPU with one warning.  A missing folder raises
    :class:`InsightFaceModelNotFoundError` saying where to put which files; nothing is ever downloaded.
    """
    root_dir = Path(root) if root is not None else insightface_root(name)
    model_dir = folders.resolve_inside(root_dir / "models", name, what="InsightFace model name")
    providers = resolve_providers(provider)
    key = (str(root_dir.resolve()), name, provider)
    with _lock:
        cached = _cache.get(key)
    if cached is not None:
        return cached
    _check_model_dir(name, model_dir)
    app = _open_pack(name, model_dir, providers)
    analyzer = FaceAnalyzer(app=app, name=name, model_dir=str(model_dir), provider=provider,
                            ort_providers=tuple(providers))
    with _lock:
        return _cache.setdefault(key, analyzer)


def _open_pack(name: str, model_dir: Path, providers: list[str]) -> Any:
    from insightface.app import FaceAnalysis as InsightFaceApp

    try:
        # A directory path as ``name`` is used as is (no download); only the two models FaceID needs are opened.
        app = InsightFaceApp(name=str(model_dir), root=str(model_dir.parent.parent), providers=providers,
                             allowed_modules=["detection", "recognition"])
    except AssertionError as exc:  # insightface asserts that a detector was found
        raise InsightFaceModelNotFoundError(
            _missing_pack_message(name, model_dir, "has no face detection model among its .onnx files")) from exc
    if "recognition" not in app.models:
        raise InsightFaceModelNotFoundError(
            _missing_pack_message(name, model_dir, "has no face recognition model among its .onnx files"))
    app.prepare(ctx_id=0, det_thresh=0.5, det_size=(DET_SIZES[0], DET_SIZES[0]))
    return app


def _to_bgr_uint8(images: torch.Tensor) -> np.ndarray:
    """IMAGE [B,H,W,C] 0..1 → uint8 BGR [B,H,W,3], the layout insightface (OpenCV) expects.

    Values are truncated after clamping, as the reference pack's conversion does, so that the same image
    gives the same detection and embedding in both.
    """
    pixels = (images[..., :3].detach().to("cpu", torch.float32) * 255.0).clamp(0, 255).to(torch.uint8)
    return np.ascontiguousarray(pixels.numpy()[..., ::-1])


def _check_inputs(images: Any, crop_size: int, face_index: int | None, on_no_face: str) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[-1] not in (3, 4):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"face analysis expects an IMAGE tensor [B,H,W,3] with values 0..1; got {shape}")
    if crop_size <= 0 or (crop_size % 112 and crop_size % 128):
        raise ValueError(f"face crop size {crop_size} is not supported: insightface aligns faces to multiples of "
                         f"112 or 128 px (224 for SD1.5, 256 for SDXL, 336 for Kolors)")
    if face_index is not None and face_index < 0:
        raise ValueError(f"face_index must be 0 or more (faces counted left to right); got {face_index}")
    if on_no_face not in NO_FACE_ACTIONS:
        raise ValueError(f"on_no_face must be one of {', '.join(NO_FACE_ACTIONS)}; got '{on_no_face}'")


def _detect(detector: Any, image: np.ndarray, det_sizes: Sequence[int]) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Detect at each size in turn until a face is found; returns (boxes [n,5], keypoints [n,5,2], size used)."""
    boxes = np.zeros((0, 5), np.float32)
    kps = None
    for size in det_sizes:
        boxes, kps = detector.detect(image, input_size=(size, size))
        if len(boxes):
            if size != det_sizes[0]:
                logger.info("InsightFace: face found after lowering the detector size to %d", size)
            return boxes, kps, size
    return boxes, kps, 0


def _choose(boxes: np.ndarray, face_index: int | None, image_number: int) -> int:
    """Row of ``boxes`` to use: the largest face, or the ``face_index``-th counted left to right."""
    if face_index is None:
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        return int(np.argmax(areas))
    # Left to right (then top to bottom) is an order a user can see in the picture; detector order is not.
    order = sorted(range(len(boxes)), key=lambda i: ((boxes[i, 0] + boxes[i, 2]) / 2, (boxes[i, 1] + boxes[i, 3]) / 2))
    if face_index >= len(order):
        raise IndexError(f"face_index {face_index} asks for face number {face_index + 1} (counted left to right) in "
                         f"image {image_number}, but InsightFace found {len(order)} face(s) there; use 0.."
                         f"{len(order) - 1}, or leave the index unset to take the largest face")
    return order[face_index]


def analyze_faces(analyzer: FaceAnalyzer | Any, images: torch.Tensor, crop_size: int = 224,
                  face_index: int | None = None, on_no_face: str = "error", normed: bool = True,
                  det_sizes: Sequence[int] = DET_SIZES) -> FaceAnalysis:
    """Find one face per image: its embedding and its aligned crop.

    ``analyzer``: a :class:`FaceAnalyzer` (or insightface's ``FaceAnalysis`` itself).  ``images``: IMAGE
    ``[B,H,W,C]`` 0..1.  Detection is retried at each of ``det_sizes`` until a face is found.  The largest
    face is used, or with ``face_index`` the n-th face counted left to right.  ``normed=False`` returns the
    raw ArcFace embedding (Portrait-unnorm).  An image without a face raises :class:`FaceNotFoundError`
    naming it, or with ``on_no_face="skip"`` yields no row (``found`` False).
    """
    from insightface.app.common import Face
    from insightface.utils import face_align

    _check_inputs(images, crop_size, face_index, on_no_face)
    app = getattr(analyzer, "app", analyzer)
    detector, recognizer = app.det_model, app.models.get("recognition")
    if recognizer is None:
        raise InsightFaceModelNotFoundError("the InsightFace model has no face recognition model; FaceID needs one")
    embeds, crops, boxes, found, rows, sizes = [], [], [], [], [], []
    batch = _to_bgr_uint8(images)
    for i, image in enumerate(batch):
        det, kpss, size = _detect(detector, image, det_sizes)
        if not len(det):
            if on_no_face == "skip":
                logger.warning("InsightFace: no face in image %d; skipping it", i)
                found.append(False)
                continue
            tried = ", ".join(str(s) for s in det_sizes)
            raise FaceNotFoundError(
                f"InsightFace found no face in image {i} (of {len(batch)}) at detector sizes {tried}. Use a picture "
                f"with a clearly visible face, or set on_no_face to 'skip' to leave that image out")
        if kpss is None:
            raise ValueError("the InsightFace detector gives no facial keypoints, which face alignment needs; "
                             "use a detector with keypoints (det_10g.onnx in buffalo_l)")
        k = _choose(det, face_index, i)
        face = Face(bbox=det[k, :4], kps=kpss[k], det_score=det[k, 4])
        recognizer.get(image, face)  # sets face.embedding from insightface's own 112 px alignment
        embedding = face.normed_embedding if normed else face.embedding
        embeds.append(torch.from_numpy(np.asarray(embedding, dtype=np.float32).reshape(-1)))
        crop = face_align.norm_crop(image, landmark=kpss[k], image_size=crop_size)
        crops.append(torch.from_numpy(np.ascontiguousarray(crop[..., ::-1])).float() / 255.0)
        boxes.append(torch.from_numpy(det[k, :4].astype(np.float32)))
        found.append(True)
        rows.append(i)
        sizes.append(size)
    dim = embeds[0].shape[0] if embeds else EMBED_DIM
    return FaceAnalysis(
        embeds=torch.stack(embeds) if embeds else torch.zeros(0, dim),
        crops=torch.stack(crops) if crops else torch.zeros(0, crop_size, crop_size, 3),
        found=found, image_index=rows, det_sizes=sizes,
        boxes=torch.stack(boxes) if boxes else torch.zeros(0, 4),
    )
