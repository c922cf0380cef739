"""The clinician web app's JSON API, pages and settings, through FastAPI's TestClient with a small real model."""

import asyncio
import base64
import csv
import io
import os
import re
import shutil
import sqlite3
import struct
import zlib
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from client.web.app import create_app
from client.web.inference import Classifier
from client.web.settings import load_web_settings
from client.web.store import spreadsheet_safe
from client.web.users import UserList, authenticate, hash_token
from client.web_cli import main as web_main
from shared.data.cache import build_image_cache
from shared.data.loading import make_eval_loader
from shared.data.readers import read_dataset
from shared.data.records import ImageTable
from shared.data.transforms import build_eval_transform
from shared.errors import ConfigError
from shared.models.classifier import load_classifier
from web_support import CLASSES, image_bytes, lesion_image, train_tiny_model


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    return train_tiny_model(folder / "final_model.pt", seed=0), train_tiny_model(folder / "round_002.pt", seed=1)


@pytest.fixture(scope="module")
def shared_classifier(model_files):
    return Classifier([model_files[0]], malignant_classes=["mel", "bcc", "akiec"])


def _site(tmp_path, model_files, classifier=None, **settings):
    settings.setdefault("models", [model_files[0]])
    loaded = load_web_settings(None, data_dir=tmp_path / "web", **settings)
    users = UserList(loaded.users_path)
    tokens = {"dr.alice": users.add("dr.alice"), "dr.bob": users.add("dr.bob")}
    return TestClient(create_app(loaded, classifier)), tokens, loaded


@pytest.fixture
def site(tmp_path, model_files, shared_classifier):
    client, tokens, settings = _site(tmp_path, model_files, shared_classifier)
    client.headers["Authorization"] = f"Bearer {tokens['dr.alice']}"
    return client, tokens, settings


def _upload(*files):
    return [("files", file) for file in files]


def _jpeg(name="lesion.jpg", label="mel", seed=1):
    return (name, image_bytes(lesion_image(label, seed)), "image/jpeg")


def _classify(client, *files):
    response = client.post("/api/classify", files=_upload(*(files or [_jpeg()])))
    assert response.status_code == 200, response.text
    return response.json()


def _error_code(response, status):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["message"]
    return body["error"]["code"]


def _case_rows(settings):
    with sqlite3.connect(settings.database_path) as connection:
        return connection.execute("SELECT case_id, image_path, status FROM cases").fetchall()


def _stored_images(settings):
    return sorted(path.name for path in settings.images_dir.iterdir())


# ---- authentication ------------------------------------------------------------------------------

PROTECTED = [
    ("get", "/api/me"),
    ("get", "/api/model"),
    ("post", "/api/classify"),
    ("get", "/api/cases"),
    ("get", "/api/cases.csv"),
    ("get", f"/api/cases/{'a' * 32}"),
    ("get", f"/api/cases/{'a' * 32}/image"),
    ("post", f"/api/cases/{'a' * 32}/feedback"),
]


@pytest.mark.parametrize("method,path", PROTECTED)
def test_every_data_endpoint_refuses_a_missing_or_wrong_token(tmp_path, model_files, shared_classifier, method, path):
    client, tokens, _ = _site(tmp_path, model_files, shared_classifier)
    assert _error_code(getattr(client, method)(path), 401) == "unauthorised"
    wrong = {"Authorization": "Bearer " + tokens["dr.alice"][:-2] + "xx"}
    response = getattr(client, method)(path, headers=wrong)
    assert _error_code(response, 401) == "unauthorised" and response.headers["www-authenticate"] == "Bearer"
    basic = {"Authorization": "Basic " + base64.b64encode(b"dr.alice:x").decode()}
    assert _error_code(getattr(client, method)(path, headers=basic), 401) == "unauthorised"


def test_health_needs_no_token_and_says_nothing_else(site):
    client, _, _ = site
    assert TestClient(client.app).get("/api/health").json() == {"status": "ok", "model": "current"}


def test_the_token_is_checked_before_a_byte_of_the_body_is_read(site):
    client, tokens, _ = site
    reads, sent = [], []

    async def receive():
        reads.append(1)
        return {"type": "http.request", "body": b"x" * 65536, "more_body": True}

    async def send(message):
        sent.append(message)

    for authorization in (b"", b"Bearer " + tokens["dr.alice"][:-2].encode() + b"xx"):
        scope = {
            "type": "http", "method": "POST", "path": "/api/classify", "raw_path": b"/api/classify", "query_string": b"",
            "headers": [(b"content-type", b"multipart/form-data; boundary=x"), (b"content-length", b"100000000"),
                        *([(b"authorization", authorization)] if authorization else [])],
            "scheme": "http", "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5000), "http_version": "1.1",
        }
        asyncio.run(client.app(scope, receive, send))
        assert sent[-2]["status"] == 401 and b'"unauthorised"' in sent[-1]["body"]
    assert reads == []


def test_me_names_the_user_of_the_token(site):
    client, tokens, _ = site
    assert client.get("/api/me").json() == {"user": "dr.alice"}
    assert client.get("/api/me", headers={"Authorization": f"Bearer {tokens['dr.bob']}"}).json() == {"user": "dr.bob"}


def test_a_removed_user_is_refused_at_the_next_request(site):
    client, tokens, settings = site
    bob = {"Authorization": f"Bearer {tokens['dr.bob']}"}
    assert client.get("/api/me", headers=bob).status_code == 200
    UserList(settings.users_path).remove("dr.bob")
    assert _error_code(client.get("/api/me", headers=bob), 401) == "unauthorised"
    assert client.get("/api/me").status_code == 200


def test_users_file_keeps_only_hashes_and_tokens_match_in_constant_time(tmp_path):
    users = UserList(tmp_path / "users.json")
    token = users.add("dr.carol")
    text = (tmp_path / "users.json").read_text()
    assert token not in text and hash_token(token) in text
    assert oct(os.stat(tmp_path / "users.json").st_mode & 0o777) == "0o600"
    assert authenticate(UserList(tmp_path / "users.json").users, token).name == "dr.carol"
    assert authenticate(users.users, token + "x") is None
    with pytest.raises(ConfigError, match="already exists.*--replace"):
        users.add("dr.carol")
    with pytest.raises(ConfigError, match="user name"):
        users.add("../etc")


# ---- model and classification ----------------------------------------------------------------------


def test_model_describes_classes_malignant_classes_and_version(site):
    client, _, _ = site
    info = client.get("/api/model").json()
    assert info["classes"] == CLASSES
    assert info["malignant_classes"] == ["mel", "bcc", "akiec"]
    assert re.fullmatch(r"final_model\.pt@[0-9a-f]{12}", info["version"])
    assert info["ensemble_size"] == 1 and info["image_size"] == 64
    assert info["class_names"]["mel"] == "Melanoma" and "does not replace" in info["clinical_note"]


def test_classify_returns_probabilities_flag_and_overlay_and_keeps_a_pending_case(site):
    client, _, settings = site
    answer = _classify(client, _jpeg("a.jpg", "mel", 1), ("b.png", image_bytes(lesion_image("nv", 2), "PNG"), "image/png"))
    assert [result["upload_position"] for result in answer["results"]] == [0, 1]
    for result in answer["results"]:
        assert set(result["probabilities"]) == set(CLASSES)
        assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert result["top_class"] == max(result["probabilities"], key=result["probabilities"].get)
        malignant = sum(result["probabilities"][name] for name in ("mel", "bcc", "akiec"))
        assert result["malignant_probability"] == pytest.approx(malignant)
        assert result["malignant"] == (result["top_class"] in ("mel", "bcc", "akiec") or malignant >= 0.5)
        overlay = Image.open(io.BytesIO(base64.b64decode(result["overlay_jpeg_base64"])))
        assert overlay.format == "JPEG" and overlay.size == (384, 384)
        case = client.get(f"/api/cases/{result['case_id']}").json()
        assert case["status"] == "pending" and case["created_by"] == "dr.alice"
        assert case["model_version"] == answer["model_version"] and case["predicted_label"] == result["top_class"]
    assert _stored_images(settings) == sorted(
        [answer["results"][0]["case_id"] + ".jpg", answer["results"][1]["case_id"] + ".png"]
    )
    private = [settings.database_path, settings.images_dir, *settings.images_dir.iterdir()]
    assert all(os.stat(path).st_mode & 0o077 == 0 for path in private), "patient data readable by other accounts"


def test_the_web_app_sees_an_image_exactly_as_training_and_evaluation_do(site, model_files, tmp_path):
    client, _, _ = site
    folder = tmp_path / "export" / "mel"
    folder.mkdir(parents=True)
    upload = ("case.jpg", image_bytes(lesion_image("mel", 8, width=600, height=450)), "image/jpeg")  # big enough for JPEG draft decoding
    (folder / "case.jpg").write_bytes(upload[1])
    model, saved = load_classifier(model_files[0])
    table = read_dataset(tmp_path / "export", "folder")
    table = ImageTable(frame=table.frame, classes=saved.classes, format="folder", root=table.root)
    cached = build_image_cache(table, tmp_path / "cache", saved.preprocess, progress=False)
    loader = make_eval_loader(cached, batch_size=1, transform=build_eval_transform(saved.mean, saved.std))
    with torch.no_grad():
        expected = torch.softmax(model(next(iter(loader))[0]), dim=1)[0]
    served = _classify(client, upload)["results"][0]["probabilities"]
    assert [served[name] for name in saved.classes] == pytest.approx(expected.tolist(), abs=1e-5)


def test_upload_file_names_are_never_used_for_paths(site, tmp_path):
    client, _, settings = site
    answer = _classify(client, _jpeg("../../../outside.jpg"), _jpeg("/etc/passwd.jpg", seed=3))
    assert not (tmp_path / "outside.jpg").exists()
    assert _stored_images(settings) == sorted(result["case_id"] + ".jpg" for result in answer["results"])
    exported = client.get("/api/cases.csv").text
    assert "outside" not in exported and "passwd" not in exported


def test_an_ensemble_averages_the_probabilities_of_its_models(tmp_path, model_files):
    upload = _jpeg()
    single = []
    for index, model in enumerate(model_files):
        client, tokens, _ = _site(tmp_path / f"single{index}", model_files, models=[model])
        client.headers["Authorization"] = f"Bearer {tokens['dr.alice']}"
        single.append(_classify(client, upload)["results"][0]["probabilities"])
    client, tokens, _ = _site(tmp_path / "ensemble", model_files, models=list(model_files))
    client.headers["Authorization"] = f"Bearer {tokens['dr.alice']}"
    assert client.get("/api/model").json()["ensemble_size"] == 2
    answer = _classify(client, upload)
    assert "+" in answer["model_version"]
    for name in CLASSES:
        assert answer["results"][0]["probabilities"][name] == pytest.approx((single[0][name] + single[1][name]) / 2, abs=1e-5)


def test_a_new_model_file_is_served_without_a_restart(tmp_path, model_files):
    served = tmp_path / "final_model.pt"
    shutil.copyfile(model_files[0], served)
    client, tokens, _ = _site(tmp_path, model_files, models=[served])
    client.headers["Authorization"] = f"Bearer {tokens['dr.alice']}"
    before = client.get("/api/model").json()["version"]
    shutil.copyfile(model_files[1], served)
    after = client.get("/api/model").json()["version"]
    assert after != before and after.startswith("final_model.pt@")
    assert _classify(client)["model_version"] == after


# ---- bad uploads -----------------------------------------------------------------------------------


def _truncated_jpeg():
    data = image_bytes(lesion_image("mel", 5, width=600, height=450))
    return data[: len(data) // 2]


BAD_UPLOADS = [
    ("not_an_image", 415, ("notes.jpg", b"patient notes, not an image", "image/jpeg")),
    ("unsupported_format", 415, ("scan.gif", image_bytes(lesion_image("nv", 1), "GIF"), "image/gif")),
    ("unsupported_format", 415, ("scan.bmp", image_bytes(lesion_image("nv", 1), "BMP"), "image/bmp")),
    ("corrupt_image", 422, ("cut.jpg", _truncated_jpeg(), "image/jpeg")),
    ("corrupt_image", 422, ("cut.png", image_bytes(lesion_image("nv", 1), "PNG")[:2000], "image/png")),
    ("empty_file", 400, ("empty.jpg", b"", "image/jpeg")),
]


@pytest.mark.parametrize("code,status,bad", BAD_UPLOADS, ids=[f"{code}-{bad[0]}" for code, _, bad in BAD_UPLOADS])
def test_a_bad_upload_gets_a_clear_error_and_nothing_is_kept(site, code, status, bad):
    client, _, settings = site
    response = client.post("/api/classify", files=_upload(_jpeg("good.jpg"), bad))
    assert _error_code(response, status) == code
    assert f"file 2 ('{bad[0]}')" in response.json()["error"]["message"]
    assert _stored_images(settings) == [] and _case_rows(settings) == []


def test_size_dimension_and_count_limits(tmp_path, model_files, shared_classifier):
    client, tokens, settings = _site(tmp_path, model_files, shared_classifier, max_upload_mb=0.02, max_image_side=300, max_files=2)
    client.headers["Authorization"] = f"Bearer {tokens['dr.alice']}"
    big = ("big.png", image_bytes(lesion_image("nv", 1, width=280, height=200), "PNG"), "image/png")
    assert len(big[1]) > 0.02 * 2**20
    assert _error_code(client.post("/api/classify", files=_upload(big)), 413) == "file_too_large"
    wide = ("wide.jpg", image_bytes(Image.new("RGB", (301, 20), (200, 150, 120))), "image/jpeg")
    assert _error_code(client.post("/api/classify", files=_upload(wide)), 413) == "image_too_large"
    three = _upload(_jpeg("1.jpg"), _jpeg("2.jpg"), _jpeg("3.jpg"))
    assert _error_code(client.post("/api/classify", files=three), 400) == "too_many_files"
    assert _stored_images(settings) == [] and _case_rows(settings) == []
    assert len(_classify(client, _jpeg("1.jpg"), _jpeg("2.jpg"))["results"]) == 2


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG declaring `width`x`height` with no pixel data (what a decompression bomb's header looks like)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_pixel_caps_per_image_and_per_request_apply_before_decoding(tmp_path, model_files, shared_classifier):
    client, tokens, settings = _site(tmp_path, model_files, shared_classifier, max_image_megapixels=0.05, max_request_megapixels=0.05)
    client.headers["Authorization"] = f"Bearer {tokens['dr.alice']}"
    # A few KB of flat PNG that decodes to far more memory than its size: refused from its header.
    flat = ("flat.png", image_bytes(Image.new("RGB", (300, 200), (180, 120, 100)), "PNG"), "image/png")
    response = client.post("/api/classify", files=_upload(flat))
    assert _error_code(response, 413) == "image_too_large" and "(0.06 million), over the limit of 0.05 million" in response.json()["error"]["message"]
    # PIL's own decompression-bomb guard (a header declaring 20000 x 20000) answers the same 413 in JSON.
    bomb = ("bomb.png", _png_header_only(20_000, 20_000), "image/png")
    assert _error_code(client.post("/api/classify", files=_upload(bomb)), 413) == "image_too_large"
    # Two images within the per-image cap but over the per-request cap together.
    two = _upload(_jpeg("1.jpg"), _jpeg("2.jpg"))
    response = client.post("/api/classify", files=two)
    assert _error_code(response, 413) == "request_too_many_pixels" and "max-request-megapixels" in response.json()["error"]["message"]
    assert _stored_images(settings) == [] and _case_rows(settings) == []
    assert len(_classify(client, _jpeg("1.jpg"))["results"]) == 1


def test_an_unreadable_new_model_file_leaves_the_last_good_model_in_service_reported_stale(tmp_path, model_files):
    served = tmp_path / "final_model.pt"
    shutil.copyfile(model_files[0], served)
    client, tokens, _ = _site(tmp_path, model_files, models=[served])
    client.headers["Authorization"] = f"Bearer {tokens['dr.alice']}"
    good = client.get("/api/model").json()["version"]
    served.write_bytes(model_files[1].read_bytes()[:5000])  # a half-copied file
    described = client.get("/api/model").json()
    assert described["version"] == good and "final_model.pt" in described["stale"]
    assert client.get("/api/health").json() == {"status": "ok", "model": "stale"}
    assert _classify(client)["model_version"] == good
    shutil.copyfile(model_files[1], served)
    assert client.get("/api/model").json()["stale"] == {} and client.get("/api/health").json()["model"] == "current"
    assert _classify(client)["model_version"] != good


def test_an_unexpected_server_error_is_json_with_a_reference_not_a_trace(tmp_path, model_files, shared_classifier, caplog):
    _, tokens, settings = _site(tmp_path, model_files, shared_classifier)
    client = TestClient(create_app(settings, shared_classifier), raise_server_exceptions=False)
    client.headers["Authorization"] = f"Bearer {tokens['dr.alice']}"
    with sqlite3.connect(settings.database_path) as connection:
        connection.execute("DROP TABLE cases")
    response = client.get("/api/cases")
    assert _error_code(response, 500) == "internal_error"
    reference = re.search(r"reference ([0-9a-f]{12})", response.json()["error"]["message"]).group(1)
    assert "Traceback" not in response.text and "sqlite" not in response.text.lower()
    assert reference in caplog.text and "no such table" in caplog.text


def test_an_oversized_request_body_is_refused_before_it_is_read(site):
    client, _, settings = site
    limit = settings.max_files * settings.max_upload_bytes + 2**20
    response = client.post(
        "/api/classify", content=b"x" * 16, headers={"content-length": str(limit + 1), "content-type": "multipart/form-data; boundary=x"}
    )
    assert _error_code(response, 413) == "request_too_large"


def test_an_oversized_streamed_body_without_length_is_cut_off(tmp_path, model_files, shared_classifier):
    client, tokens, settings = _site(tmp_path, model_files, shared_classifier, max_upload_mb=0.01, max_files=1)
    client.headers["Authorization"] = f"Bearer {tokens['dr.alice']}"

    def chunks():
        for _ in range(40):
            yield b"x" * 65536

    response = client.post("/api/classify", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
    assert _error_code(response, 413) == "request_too_large"
    assert _stored_images(settings) == []


def test_a_request_without_files_is_a_validation_error(site):
    client, _, _ = site
    assert _error_code(client.post("/api/classify", data={"other": "x"}), 422) == "invalid_request"


# ---- feedback, cases, export -------------------------------------------------------------------------


def test_confirming_and_correcting_record_label_note_user_and_time(site):
    client, tokens, _ = site
    first, second = _classify(client, _jpeg("a.jpg"), _jpeg("b.jpg", seed=2))["results"]
    confirmed = client.post(f"/api/cases/{first['case_id']}/feedback", json={"label": first["top_class"]}).json()
    assert confirmed["status"] == "confirmed" and confirmed["label"] == first["top_class"] and confirmed["note"] is None
    other = next(name for name in CLASSES if name != second["top_class"])
    bob = {"Authorization": f"Bearer {tokens['dr.bob']}"}
    corrected = client.post(f"/api/cases/{second['case_id']}/feedback", json={"label": other, "note": " irregular border "}, headers=bob)
    body = corrected.json()
    assert body["status"] == "corrected" and body["label"] == other and body["note"] == "irregular border"
    assert body["reviewed_by"] == "dr.bob" and body["created_by"] == "dr.alice" and body["reviewed_at"] >= body["created_at"]


def test_feedback_bad_inputs(site):
    client, _, _ = site
    case_id = _classify(client)["results"][0]["case_id"]
    assert _error_code(client.post(f"/api/cases/{case_id}/feedback", json={"label": "cancer"}), 422) == "unknown_label"
    assert _error_code(client.post(f"/api/cases/{case_id}/feedback", json={"note": "x"}), 422) == "invalid_request"
    assert _error_code(client.post(f"/api/cases/{case_id}/feedback", json={"label": "mel", "note": "x" * 2001}), 422) == "invalid_request"
    not_json = client.post(f"/api/cases/{case_id}/feedback", content=b"not json", headers={"content-type": "application/json"})
    assert _error_code(not_json, 422) == "invalid_request"
    assert _error_code(client.post(f"/api/cases/{'0' * 32}/feedback", json={"label": "mel"}), 404) == "unknown_case"
    assert _error_code(client.post("/api/cases/..%2F..%2Fetc/feedback", json={"label": "mel"}), 404) in ("not_found", "unknown_case")
    assert _error_code(client.post("/api/cases/ABC/feedback", json={"label": "mel"}), 422) == "invalid_request"
    assert client.get(f"/api/cases/{case_id}").json()["status"] == "pending"


def test_case_list_filters_by_status_and_counts(site):
    client, _, _ = site
    first, second, third = _classify(client, _jpeg("a.jpg"), _jpeg("b.jpg", seed=2), _jpeg("c.jpg", seed=3))["results"]
    client.post(f"/api/cases/{first['case_id']}/feedback", json={"label": first["top_class"]})
    other = next(name for name in CLASSES if name != second["top_class"])
    client.post(f"/api/cases/{second['case_id']}/feedback", json={"label": other})
    listing = client.get("/api/cases").json()
    assert [case["case_id"] for case in listing["cases"]] == [third["case_id"], second["case_id"], first["case_id"]]
    assert listing["counts"] == {"pending": 1, "confirmed": 1, "corrected": 1}
    assert [case["case_id"] for case in client.get("/api/cases?status=corrected").json()["cases"]] == [second["case_id"]]
    assert len(client.get("/api/cases?limit=1").json()["cases"]) == 1
    assert _error_code(client.get("/api/cases?status=deleted"), 422) == "invalid_request"
    assert _error_code(client.get("/api/cases?limit=0"), 422) == "invalid_request"


def test_case_and_its_image(site):
    client, _, settings = site
    upload = _jpeg()
    case_id = _classify(client, upload)["results"][0]["case_id"]
    image = client.get(f"/api/cases/{case_id}/image")
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg" and image.content == upload[1]
    assert _error_code(client.get(f"/api/cases/{'f' * 32}"), 404) == "unknown_case"
    assert _error_code(client.get(f"/api/cases/{'f' * 32}/image"), 404) == "unknown_case"
    (settings.images_dir / f"{case_id}.jpg").unlink()
    assert _error_code(client.get(f"/api/cases/{case_id}/image"), 404) == "image_missing"


def test_csv_export_lists_every_case_and_neutralises_formulas(site):
    client, _, _ = site
    first, second = _classify(client, _jpeg("a.jpg"), _jpeg("b.jpg", seed=2))["results"]
    client.post(f"/api/cases/{first['case_id']}/feedback", json={"label": "mel", "note": '=HYPERLINK("http://x","click")'})
    client.post(f"/api/cases/{second['case_id']}/feedback", json={"label": "nv", "note": "@SUM(1)"})
    response = client.get("/api/cases.csv")
    assert response.headers["content-type"].startswith("text/csv") and "attachment" in response.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert [row["case_id"] for row in rows] == [first["case_id"], second["case_id"]]
    assert rows[0]["note"] == "'=HYPERLINK(\"http://x\",\"click\")" and rows[1]["note"] == "'@SUM(1)"
    assert float(rows[0]["probability_mel"]) == pytest.approx(first["probabilities"]["mel"], abs=1e-6)
    assert [spreadsheet_safe(text) for text in ("-2+3", " =1", "\tx", "plain", None)] == ["'-2+3", "' =1", "'\tx", "plain", None]


# ---- pages, documentation and safety headers ---------------------------------------------------------


def test_openapi_documents_every_endpoint_and_the_reference_page_needs_no_cdn(site):
    client, _, _ = site
    schema = client.get("/openapi.json").json()
    assert set(schema["paths"]) == {
        "/api/health", "/api/me", "/api/model", "/api/classify", "/api/cases", "/api/cases.csv",
        "/api/cases/{case_id}", "/api/cases/{case_id}/image", "/api/cases/{case_id}/feedback",
    }
    assert "HTTPBearer" in schema["components"]["securitySchemes"]
    assert {"ClassifyResponse", "Case", "CaseList", "FeedbackRequest", "ErrorResponse"} <= set(schema["components"]["schemas"])
    assert "413" in schema["paths"]["/api/classify"]["post"]["responses"]
    reference = client.get("/api/docs")
    assert reference.status_code == 200 and "/api/classify" in reference.text and "FeedbackRequest" in reference.text
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404


@pytest.mark.parametrize("path", ["/", "/cases", "/api/docs", "/static/common.js", "/static/classify.js", "/static/cases.js", "/static/style.css"])
def test_pages_load_nothing_from_outside_the_site(site, path):
    client, _, _ = site
    response = TestClient(client.app).get(path)
    assert response.status_code == 200
    assert not re.search(r"(src|href)\s*=\s*['\"]?(https?:)?//", response.text), "the page refers to another server"
    assert "fetch(\"http" not in response.text and "cdn" not in response.text.lower()
    assert "default-src 'self'" in response.headers["content-security-policy"]
    assert response.headers["x-frame-options"] == "DENY" and response.headers["referrer-policy"] == "no-referrer"


def test_pages_show_that_the_tool_supports_and_does_not_replace_a_diagnosis(site):
    client, _, _ = site
    for path in ("/", "/cases"):
        assert "does not replace, a clinician's diagnosis" in TestClient(client.app).get(path).text


def test_api_answers_are_not_cached(site):
    client, _, _ = site
    assert client.get("/api/cases").headers["cache-control"] == "no-store"


def test_unknown_paths_get_a_json_error(site):
    client, _, _ = site
    assert _error_code(client.get("/api/nothing"), 404) == "not_found"


# ---- settings and command line -------------------------------------------------------------------------


def test_settings_refuse_plain_http_beyond_loopback_and_partial_tls(tmp_path, model_files):
    with pytest.raises(ConfigError, match="plain HTTP beyond this machine"):
        load_web_settings(None, data_dir=tmp_path, models=[model_files[0]], host="0.0.0.0")
    with pytest.raises(ConfigError, match="both tls_certfile and tls_keyfile"):
        load_web_settings(None, data_dir=tmp_path, host="10.0.0.5", tls_certfile=model_files[0])
    assert load_web_settings(None, data_dir=tmp_path, host="::1").host == "::1"
    with pytest.raises(ConfigError, match="data-dir is required"):
        load_web_settings(None)
    with pytest.raises(ConfigError, match="model file .* does not exist"):
        load_web_settings(None, data_dir=tmp_path, models=[tmp_path / "missing.pt"])


def test_settings_file_paths_are_relative_to_the_file(tmp_path, model_files):
    shutil.copyfile(model_files[0], tmp_path / "global.pt")
    config = tmp_path / "web.toml"
    config.write_text('data-dir = "site-web"\nmodels = ["global.pt"]\nmax-files = 5\nmalignant-classes = ["mel"]\n')
    settings = load_web_settings(config)
    assert settings.data_dir == tmp_path / "site-web" and settings.models == [tmp_path / "global.pt"]
    assert settings.max_files == 5 and settings.malignant_classes == ["mel"]
    config.write_text('data-dir = "x"\nmax-filez = 5\n')
    with pytest.raises(ConfigError, match="max-filez"):
        load_web_settings(config)


def test_the_shipped_example_settings_file_parses(tmp_path, model_files):
    example = Path(__file__).resolve().parents[1] / "deploy" / "web" / "skin-fl-web.example.toml"
    settings = load_web_settings(example, models=[model_files[0]], data_dir=tmp_path)
    assert settings.host == "127.0.0.1" and settings.max_files == 20 and settings.threads == 2
    assert settings.malignant_classes == ["mel", "bcc", "akiec"] and settings.malignant_threshold == 0.5


def test_cli_manages_users_and_refuses_to_serve_without_users_or_model(tmp_path, model_files, capsys):
    data_dir = str(tmp_path / "web")
    assert web_main(["add-user", "dr.alice", "--data-dir", data_dir]) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    assert authenticate(UserList(tmp_path / "web" / "users.json").users, token).name == "dr.alice"
    assert web_main(["add-user", "dr.alice", "--data-dir", data_dir]) == 2
    assert "--replace" in capsys.readouterr().err
    assert web_main(["list-users", "--data-dir", data_dir]) == 0 and capsys.readouterr().out.split() == ["dr.alice"]
    assert web_main(["serve", "--data-dir", data_dir]) == 2 and "no model to serve" in capsys.readouterr().err
    assert web_main(["remove-user", "dr.alice", "--data-dir", data_dir]) == 0
    assert web_main(["serve", "--data-dir", data_dir, "--model", str(model_files[0])]) == 2
    assert "no users" in capsys.readouterr().err
    assert web_main(["serve", "--data-dir", data_dir, "--model", str(model_files[0]), "--host", "0.0.0.0"]) == 2
    assert "plain HTTP" in capsys.readouterr().err
