"""Tiny, deterministic InsightFace model packs (FaceID tests, ``--model-map tiny``): a detector and a recognizer.

insightface routes an ONNX file to a model class by its outputs and input shape, not by its name
(``insightface/model_zoo/model_zoo.py``): nine outputs make an SCRFD detector (strides 8/16/32, two
anchors per location, with keypoints), one output with a square input of 112 px makes an ArcFace
recognizer.  The two graphs below honour exactly those contracts, with fixed weights and no training:

* **Detector.** A "face" is a filled ellipse whose colour is within ``FACE_TOLERANCE`` of ``FACE_RGB``
  on every channel.  Per pixel a 0/1 skin mask is formed; per anchor (stride s, centre (i*s, j*s)) the
  mask's moments inside a window of ``16*s`` px give the blob's centroid and, from its variance, the
  ellipse's semi-axes (a filled ellipse with semi-axis a has variance a^2/4).  An anchor scores
  ``FACE_SCORE`` when the centroid falls in its cell and the blob lies wholly inside the window (the
  mass in a window 1.5 times larger is not bigger); otherwise 0.  Boxes are therefore exact in detector
  pixels and insightface's division by the letterbox scale maps them back to the image; keypoints sit
  at ``KEYPOINTS`` (fractions of the box).  A blob wider than the largest window (~480 detector px) is
  not found: at detector size 640 a face covering 90 % of a square image is missed, at 512 it is found.
* **Recognizer.** ``embedding = W @ avgpool8x8(crop) + b`` with ``W``, ``b`` drawn from a fixed seed, so
  the embedding depends on the aligned crop's content and is not unit-norm.

``ensure_tiny_faces(root)`` writes ``<root>/insightface/models/<pack>/*.onnx`` for ``buffalo_l``
(det_10g, w600k_r50) and ``antelopev2`` (scrfd_10g_bnkps, glintr100), once, under a version stamp.
``face_image`` / ``blank_image`` draw IMAGE tensors the detector does / does not find a face in.
"""
from __future__ import annotations

import io
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

VERSION = 1
FACE_RGB = (224, 172, 140)
FACE_TOLERANCE = 40          # per channel, 0..255 units
FACE_SCORE = 0.9
STRIDES = (8, 16, 32)
WINDOW_CELLS = 2             # main window = WINDOW_CELLS * stride cells of 8 px = 16 * stride px
MIN_AREA = 64.0              # detector px^2; smaller blobs are noise
# Keypoints as fractions of the face box: left eye, right eye, nose, left/right mouth corner.
KEYPOINTS = ((0.33, 0.40), (0.67, 0.40), (0.50, 0.57), (0.37, 0.76), (0.63, 0.76))
EMBED_DIM = 512
RECOGNIZER_SEED = 1234

PACK_FILES = {
    "buffalo_l": ("det_10g.onnx", "w600k_r50.onnx"),
    "antelopev2": ("scrfd_10g_bnkps.onnx", "glintr100.onnx"),
}
# The repository root is the package root, so this is ``<repository>/.cache/tiny-faces`` for a checkout.
DEFAULT_ROOT = Path(os.environ.get(
    "IPADAPTER_TINY_FACES_CACHE", Path(__file__).resolve().parent.parent / ".cache" / "tiny-faces"))


def _window_sums(cells: torch.Tensor, kernel: int, step: int) -> torch.Tensor:
    """Sums over ``kernel`` cells centred on every ``step``-th cell (one output per anchor)."""
    left = kernel // 2
    padded = F.pad(cells, (left, left - step, left, left - step))
    return F.avg_pool2d(padded, kernel, stride=step) * float(kernel * kernel)


def _grid(like: torch.Tensor, dim: int) -> torch.Tensor:
    """0, 1, 2, ... along ``dim`` of ``like`` (built from a cumsum so the ONNX graph stays size-free)."""
    return torch.cumsum(torch.ones_like(like), dim=dim) - 1.0


class TinyDetector(torch.nn.Module):
    """SCRFD-shaped detector: input [1,3,H,W] normalised RGB, outputs 3 scores, 3 boxes, 3 keypoint sets."""

    def forward(self, x: torch.Tensor):
        rgb = x * 128.0 + 127.5  # undo insightface's (pixel - 127.5) / 128
        face = torch.tensor(FACE_RGB, dtype=x.dtype).view(1, 3, 1, 1)
        deviation = torch.amax(torch.abs(rgb - face), dim=1, keepdim=True)
        mask = (deviation <= FACE_TOLERANCE).to(x.dtype)
        px = _grid(mask, 3) + 0.5  # pixel centres in continuous coordinates
        py = _grid(mask, 2) + 0.5
        moments = torch.cat([mask, mask * px, mask * py, mask * px * px, mask * py * py], dim=1)
        cells = F.avg_pool2d(moments, 8) * 64.0  # per 8x8 cell sums
        scores, boxes, points = [], [], []
        for stride in STRIDES:
            step = stride // 8
            sums = _window_sums(cells, WINDOW_CELLS * stride, step)
            wider = _window_sums(cells[:, :1], WINDOW_CELLS * stride * 3 // 2, step)
            s0, sx, sy, sxx, syy = sums[:, 0:1], sums[:, 1:2], sums[:, 2:3], sums[:, 3:4], sums[:, 4:5]
            safe = torch.clamp(s0, min=1e-6)
            cx, cy = sx / safe, sy / safe
            half_w = 2.0 * torch.sqrt(torch.clamp(sxx / safe - cx * cx, min=0.0))
            half_h = 2.0 * torch.sqrt(torch.clamp(syy / safe - cy * cy, min=0.0))
            ax = _grid(s0, 3) * stride
            ay = _grid(s0, 2) * stride
            half = stride / 2.0
            in_cell = (cx - ax >= -half) & (cx - ax < half) & (cy - ay >= -half) & (cy - ay < half)
            whole = (wider - s0) <= 0.5 + 1e-5 * s0  # nothing outside the window, up to float rounding
            big_enough = s0 >= MIN_AREA
            score = (in_cell & whole & big_enough).to(x.dtype) * FACE_SCORE
            x1, y1, x2, y2 = cx - half_w, cy - half_h, cx + half_w, cy + half_h
            box = torch.cat([ax - x1, ay - y1, x2 - ax, y2 - ay], dim=1) / stride
            kps = []
            for fx, fy in KEYPOINTS:
                kps += [(x1 + fx * (x2 - x1) - ax) / stride, (y1 + fy * (y2 - y1) - ay) / stride]
            scores.append(self._per_anchor(score))
            boxes.append(self._per_anchor(box))
            points.append(self._per_anchor(torch.cat(kps, dim=1)))
        return tuple(scores + boxes + points)

    @staticmethod
    def _per_anchor(maps: torch.Tensor) -> torch.Tensor:
        """[1,C,h,w] -> [h*w*2, C], row-major locations, two identical anchors per location (SCRFD order)."""
        channels = maps.shape[1]
        rows = maps.permute(0, 2, 3, 1).reshape(-1, 1, channels)
        return torch.cat([rows, rows], dim=1).reshape(-1, channels)


class TinyRecognizer(torch.nn.Module):
    """ArcFace-shaped recognizer: input [N,3,112,112], output [N,512], a fixed projection of pooled pixels."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(RECOGNIZER_SEED)
        features = 3 * 8 * 8
        self.register_buffer("weight", torch.randn(EMBED_DIM, features, generator=generator) * 2.0)
        self.register_buffer("bias", torch.randn(EMBED_DIM, generator=generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.avg_pool2d(x, 14).flatten(1)  # 112 / 14 = 8
        return pooled @ self.weight.t() + self.bias


def _export(module: torch.nn.Module, example: torch.Tensor, outputs: list[str], dynamic: dict) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter announces its own deprecation
        torch.onnx.export(module.eval(), (example,), buffer, dynamo=False, opset_version=17,
                          input_names=["input.1"], output_names=outputs, dynamic_axes=dynamic)
    return buffer.getvalue()


def detector_onnx() -> bytes:
    """The tiny detector as ONNX bytes (dynamic height and width, multiples of 32)."""
    names = [f"{kind}_{s}" for kind in ("score", "bbox", "kps") for s in STRIDES]
    dynamic = {"input.1": {2: "height", 3: "width"}}
    dynamic.update({name: {0: f"anchors_{name.split('_')[1]}"} for name in names})
    return _export(TinyDetector(), torch.zeros(1, 3, 64, 64), names, dynamic)


def recognizer_onnx() -> bytes:
    """The tiny recognizer as ONNX bytes (dynamic batch)."""
    return _export(TinyRecognizer(), torch.zeros(1, 3, 112, 112), ["embedding"],
                   {"input.1": {0: "batch"}, "embedding": {0: "batch"}})


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def ensure_tiny_faces(root: str | os.PathLike | None = None) -> Path:
    """Write the tiny model packs under ``<root>/insightface/models/`` once; return the ``insightface`` folder.

    ``root`` is a ComfyUI-layout models folder (default: ``.cache/tiny-faces`` in the repository, or
    ``$IPADAPTER_TINY_FACES_CACHE``).  A stamp file records the version; a stale or partial set is rebuilt.
    """
    insightface_root = Path(root if root is not None else DEFAULT_ROOT) / "insightface"
    stamp = insightface_root / "tiny-faces.json"
    wanted = {"version": VERSION, "torch": torch.__version__.split("+")[0]}
    files = [insightface_root / "models" / pack / name for pack, names in PACK_FILES.items() for name in names]
    if stamp.is_file() and all(f.is_file() for f in files):
        try:
            if json.loads(stamp.read_text()) == wanted:
                return insightface_root
        except ValueError:
            pass  # unreadable stamp: rebuild
    detector, recognizer = detector_onnx(), recognizer_onnx()
    for pack, (det_name, rec_name) in PACK_FILES.items():
        folder = insightface_root / "models" / pack
        folder.mkdir(parents=True, exist_ok=True)
        _write_atomic(folder / det_name, detector)
        _write_atomic(folder / rec_name, recognizer)
    _write_atomic(stamp, json.dumps(wanted).encode())
    return insightface_root


def _ellipse_mask(size: tuple[int, int], cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0


def face_image(size: int | tuple[int, int] = 128, seed: int = 0,
               faces: list[tuple[float, float, float, float]] | None = None) -> torch.Tensor:
    """An IMAGE [1,H,W,3] (0..1) with synthetic faces the tiny detector finds.

    ``size``: side or (height, width).  ``faces``: ellipses as (cx, cy, rx, ry), fractions of the width
    (cx, rx) and height (cy, ry); default one centred face 50 % wide and 60 % tall.  The background is
    dark noise; each face is ``FACE_RGB`` with a seed-dependent smooth shading (within the detector's
    tolerance) and darker "eye" and "mouth" shading, so different seeds give different embeddings.
    """
    h, w = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    image = rng.uniform(0, 60, size=(h, w, 3))
    faces = faces if faces is not None else [(0.5, 0.5, 0.25, 0.3)]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    for fcx, fcy, frx, fry in faces:
        cx, cy, rx, ry = fcx * w, fcy * h, frx * w, fry * h
        inside = _ellipse_mask((h, w), cx, cy, rx, ry)
        u, v = (xx - cx) / rx, (yy - cy) / ry  # -1..1 across the face
        phase = rng.uniform(0, 2 * np.pi, size=3)
        freq = rng.uniform(1.0, 3.0, size=3)
        colour = np.stack([FACE_RGB[c] + 18 * np.sin(freq[c] * (u + v) + phase[c]) for c in range(3)], -1)
        # eyes and mouth: darker, but still inside the colour tolerance so the mask stays a full ellipse
        for ex, ey in ((-0.33, -0.2), (0.33, -0.2), (0.0, 0.5)):
            spot = ((u - ex) / 0.18) ** 2 + ((v - ey) / 0.1) ** 2 <= 1.0
            colour[spot] -= 15
        image[inside] = colour[inside]
    return torch.from_numpy(np.clip(image, 0, 255) / 255.0).float().unsqueeze(0)


def blank_image(size: int | tuple[int, int] = 128) -> torch.Tensor:
    """A plain dark-grey IMAGE [1,H,W,3] with no face in it."""
    h, w = (size, size) if isinstance(size, int) else size
    return torch.full((1, h, w, 3), 0.1)
