"""InsightFace loading and face analysis on tiny detector/recognizer ONNX models run by real insightface."""
from __future__ import annotations

import logging
import shutil
import socket

import numpy as np
import pytest
import torch

from ipadapter_nodes.core import faceid, folders
from tiny_faces import FACE_RGB, blank_image, ensure_tiny_faces, face_image

# Two faces in a 128x256 image: a small one on the left, a large one on the right (cx, cy, rx, ry as fractions).
SMALL_LEFT = (0.25, 0.5, 24 / 256, 30 / 128)
LARGE_RIGHT = (0.75, 0.5, 40 / 256, 48 / 128)


@pytest.fixture(scope="module")
def faces_root():
    """The tiny packs' ``insightface`` folder (built once, cached)."""
    return ensure_tiny_faces()


@pytest.fixture(scope="module")
def analyzer(faces_root):
    faceid.clear_cache()
    return faceid.load_insightface("buffalo_l", root=faces_root, provider="CPU")


def expected_box(size_hw, face):
    h, w = size_hw
    cx, cy, rx, ry = face
    return np.array([(cx - rx) * w, (cy - ry) * h, (cx + rx) * w, (cy + ry) * h])


# --- loading ---------------------------------------------------------------------------------------------

def test_pack_loads_detector_and_recognizer_on_cpu_and_is_cached(faces_root, analyzer):
    assert type(analyzer.detector).__name__ == "SCRFD"
    assert type(analyzer.recognizer).__name__ == "ArcFaceONNX"
    assert analyzer.ort_providers == ("CPUExecutionProvider",)
    assert faceid.load_insightface("buffalo_l", root=faces_root, provider="CPU") is analyzer


def test_antelopev2_pack_loads_from_its_own_folder(faces_root):
    pack = faceid.load_insightface("antelopev2", root=faces_root, provider="CPU")
    assert pack.model_dir.endswith("antelopev2")
    assert set(pack.app.models) == {"detection", "recognition"}


def test_default_root_is_the_insightface_models_folder(faces_root, analyzer, monkeypatch):
    monkeypatch.setattr(folders, "_provider", folders.FolderLayout(models_dirs=[str(faces_root.parent)]))
    assert faceid.insightface_root() == faces_root
    loaded = faceid.load_insightface()
    assert loaded.model_dir == analyzer.model_dir
    assert faceid.load_insightface("buffalo_l", root=faces_root, provider="CPU") is loaded  # one cache key


def test_unavailable_provider_falls_back_to_cpu_with_one_warning(faces_root, monkeypatch, caplog):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    faceid.clear_cache()
    with caplog.at_level(logging.WARNING, logger=faceid.__name__):
        first = faceid.load_insightface("buffalo_l", root=faces_root, provider="CUDA")
        second = faceid.load_insightface("buffalo_l", root=faces_root, provider="CUDA")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "CUDA" in r.getMessage()]
    assert len(warnings) == 1
    assert first is second and first.ort_providers == ("CPUExecutionProvider",)
    assert first.app.det_model.session.get_providers() == ["CPUExecutionProvider"]
    assert faceid.analyze_faces(first, face_image(64)).found == [True]


def test_provider_names_map_to_onnxruntime_names(monkeypatch):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["DmlExecutionProvider", "CPUExecutionProvider"])
    assert faceid.resolve_providers("DirectML") == ["DmlExecutionProvider", "CPUExecutionProvider"]
    assert faceid.resolve_providers("CPU") == ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match="TPU.*CPU, CUDA, ROCM, DirectML, OpenVINO, CoreML"):
        faceid.resolve_providers("TPU")


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt or insightface download fails loudly."""
    import insightface.utils.storage as storage

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(storage, "download_file", refuse)


@pytest.mark.parametrize("name, files", [("buffalo_l", ("det_10g.onnx", "w600k_r50.onnx")),
                                         ("antelopev2", ("scrfd_10g_bnkps.onnx", "glintr100.onnx"))])
def test_missing_pack_says_where_to_put_which_files(tmp_path, no_network, name, files):
    with pytest.raises(faceid.InsightFaceModelNotFoundError) as err:
        faceid.load_insightface(name, root=tmp_path, provider="CPU")
    message = str(err.value)
    assert f"{tmp_path / 'models' / name}/" in message
    assert all(f in message for f in files)
    assert "Nothing is downloaded" in message
    assert not (tmp_path / "models").exists()  # nothing was created or fetched


def test_pack_without_onnx_files_and_nested_pack_are_explained(tmp_path, faces_root, no_network):
    (tmp_path / "models" / "buffalo_l").mkdir(parents=True)
    with pytest.raises(faceid.InsightFaceModelNotFoundError, match="has no .onnx files"):
        faceid.load_insightface("buffalo_l", root=tmp_path)
    nested = tmp_path / "models" / "antelopev2" / "antelopev2"  # what unzipping the release archive in place gives
    shutil.copytree(faces_root / "models" / "antelopev2", nested)
    with pytest.raises(faceid.InsightFaceModelNotFoundError, match="nested folder .*move them up one level"):
        faceid.load_insightface("antelopev2", root=tmp_path)


def test_pack_without_recognizer_is_refused(tmp_path, faces_root, no_network):
    pack = tmp_path / "models" / "buffalo_l"
    pack.mkdir(parents=True)
    shutil.copy(faces_root / "models" / "buffalo_l" / "det_10g.onnx", pack)
    with pytest.raises(faceid.InsightFaceModelNotFoundError, match="no face recognition model"):
        faceid.load_insightface("buffalo_l", root=tmp_path)


# --- analysis ------------------------------------------------------------------------------------------

def test_face_gives_unit_embedding_box_and_aligned_crop(analyzer):
    result = faceid.analyze_faces(analyzer, face_image(128, seed=0), crop_size=224)
    assert result.found == [True] and result.image_index == [0] and result.det_sizes == [640]
    assert result.embeds.shape == (1, 512) and result.embeds.dtype == torch.float32
    assert torch.linalg.vector_norm(result.embeds[0]).item() == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(result.boxes[0].numpy(), expected_box((128, 128), (0.5, 0.5, 0.25, 0.3)), atol=1.5)
    assert result.crops.shape == (1, 224, 224, 3)
    # The crop is aligned on the face: its centre is face-coloured, in RGB order.
    centre = result.crops[0, 100:124, 100:124].reshape(-1, 3).mean(0) * 255
    np.testing.assert_allclose(centre.numpy(), FACE_RGB, atol=25)


def test_sdxl_crop_size_is_256(analyzer):
    result = faceid.analyze_faces(analyzer, face_image(128, seed=0), crop_size=faceid.CROP_SIZES["sdxl"])
    assert result.crops.shape == (1, 256, 256, 3)


def test_unnormed_embedding_is_the_raw_one(analyzer):
    image = face_image(128, seed=0)
    raw = faceid.analyze_faces(analyzer, image, normed=False).embeds[0]
    normed = faceid.analyze_faces(analyzer, image, normed=True).embeds[0]
    assert abs(torch.linalg.vector_norm(raw).item() - 1.0) > 0.5
    torch.testing.assert_close(raw / torch.linalg.vector_norm(raw), normed, atol=1e-6, rtol=0)


def test_embedding_is_deterministic_and_depends_on_the_face(analyzer):
    a = faceid.analyze_faces(analyzer, face_image(128, seed=1)).embeds[0]
    again = faceid.analyze_faces(analyzer, face_image(128, seed=1)).embeds[0]
    b = faceid.analyze_faces(analyzer, face_image(128, seed=2)).embeds[0]
    torch.testing.assert_close(a, again, atol=0, rtol=0)
    assert torch.dot(a, b).item() < 0.999


def test_bare_insightface_app_is_accepted(analyzer):
    image = face_image(128, seed=3)
    ours = faceid.analyze_faces(analyzer, image).embeds
    bare = faceid.analyze_faces(analyzer.app, image).embeds
    torch.testing.assert_close(ours, bare, atol=0, rtol=0)


def test_largest_face_is_chosen_by_default(analyzer):
    image = face_image((128, 256), seed=4, faces=[SMALL_LEFT, LARGE_RIGHT])
    result = faceid.analyze_faces(analyzer, image)
    np.testing.assert_allclose(result.boxes[0].numpy(), expected_box((128, 256), LARGE_RIGHT), atol=1.5)


def test_face_index_counts_faces_left_to_right(analyzer):
    image = face_image((128, 256), seed=4, faces=[SMALL_LEFT, LARGE_RIGHT])
    left = faceid.analyze_faces(analyzer, image, face_index=0)
    right = faceid.analyze_faces(analyzer, image, face_index=1)
    largest = faceid.analyze_faces(analyzer, image)
    np.testing.assert_allclose(left.boxes[0].numpy(), expected_box((128, 256), SMALL_LEFT), atol=1.5)
    torch.testing.assert_close(right.embeds, largest.embeds, atol=0, rtol=0)
    assert torch.dot(left.embeds[0], right.embeds[0]).item() < 0.999


def test_face_index_out_of_range_names_image_and_face_count(analyzer):
    one = face_image((128, 256), seed=0, faces=[LARGE_RIGHT])
    two = face_image((128, 256), seed=4, faces=[SMALL_LEFT, LARGE_RIGHT])
    with pytest.raises(IndexError, match=r"face_index 1 .* image 1, but InsightFace found 1 face\(s\)"):
        faceid.analyze_faces(analyzer, torch.cat([two, one]), face_index=1)
    with pytest.raises(IndexError, match=r"face_index 2 .* image 0, but InsightFace found 2 face\(s\)"):
        faceid.analyze_faces(analyzer, two, face_index=2)


def test_no_face_error_names_the_image(analyzer):
    with pytest.raises(faceid.FaceNotFoundError, match="no face in image 0"):
        faceid.analyze_faces(analyzer, blank_image(64))
    with pytest.raises(faceid.FaceNotFoundError, match="no face in image 1 "):
        faceid.analyze_faces(analyzer, torch.cat([face_image(64), blank_image(64)]))


def test_no_face_skip_leaves_the_image_out(analyzer):
    only_blank = faceid.analyze_faces(analyzer, blank_image(64), on_no_face="skip", crop_size=256)
    assert only_blank.found == [False] and only_blank.image_index == []
    assert only_blank.embeds.shape == (0, 512) and only_blank.crops.shape == (0, 256, 256, 3)
    mixed = faceid.analyze_faces(analyzer, torch.cat([blank_image(64), face_image(64, seed=6)]), on_no_face="skip")
    assert mixed.found == [False, True] and mixed.image_index == [1] and mixed.embeds.shape == (1, 512)


def test_detection_retries_at_smaller_detector_sizes(analyzer, monkeypatch):
    # A face filling 94 % of the picture is too big for the tiny detector at 640 and 576 px, found at 512.
    tried = []
    detect = analyzer.detector.detect

    def spy(image, input_size=None, **kwargs):
        tried.append(input_size)
        return detect(image, input_size=input_size, **kwargs)

    monkeypatch.setattr(analyzer.detector, "detect", spy)
    face = (0.5, 0.5, 0.47, 0.47)
    result = faceid.analyze_faces(analyzer, face_image(100, seed=7, faces=[face]))
    assert tried == [(640, 640), (576, 576), (512, 512)]
    assert result.det_sizes == [512]
    np.testing.assert_allclose(result.boxes[0].numpy(), expected_box((100, 100), face), atol=1.5)
    tried.clear()
    with pytest.raises(faceid.FaceNotFoundError, match="640, 576, 512, 448, 384, 320"):
        faceid.analyze_faces(analyzer, blank_image(64))
    assert tried == [(s, s) for s in faceid.DET_SIZES]


def test_bad_inputs_are_explained(analyzer):
    with pytest.raises(ValueError, match="crop size 200"):
        faceid.analyze_faces(analyzer, face_image(64), crop_size=200)
    with pytest.raises(ValueError, match=r"IMAGE tensor \[B,H,W,3\]"):
        faceid.analyze_faces(analyzer, torch.zeros(64, 64, 3))
    with pytest.raises(ValueError, match="on_no_face"):
        faceid.analyze_faces(analyzer, face_image(64), on_no_face="ignore")
