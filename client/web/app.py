"""The clinician web app (FastAPI): JSON API to classify, explain and label images, and the plain HTML pages on top."""


import base64
import io
import logging
import os
import secrets
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi import Path as PathParameter
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from client.web.api_docs import render_api_reference
from client.web.inference import Classifier
from client.web.settings import WebSettings
from client.web.store import CaseRecord, FeedbackStore, UnknownCase, utc_now
from client.web.uploads import UploadRejected, check_request_pixels, check_upload, describe, new_case_id, store_upload
from client.web.users import User, UserList, authenticate
from shared.data.feedback import CASE_STATUSES
from shared.errors import DataError

logger = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).parent / "static"
CASE_ID_PATTERN = r"^[0-9a-f]{32}$"
MAX_NOTE_CHARACTERS = 2000
MULTIPART_OVERHEAD_BYTES = 1 << 20
CLINICAL_NOTE = (
    "Decision support only: skin-fl supports, and does not replace, a clinician's diagnosis. "
    "Every result must be checked by a qualified clinician."
)
CLASS_NAMES = {
    "akiec": "Actinic keratosis / intraepithelial carcinoma",
    "bcc": "Basal cell carcinoma",
    "bkl": "Benign keratosis",
    "df": "Dermatofibroma",
    "mel": "Melanoma",
    "nv": "Melanocytic nevus",
    "vasc": "Vascular lesion",
}
SECURITY_HEADERS = {
    # Everything the pages load comes from this server; nothing may be fetched from or sent elsewhere.
    "content-security-policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
        "font-src 'self'; object-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
}


# ---- API models ------------------------------------------------------------------------------


class ErrorBody(BaseModel):
    """What went wrong, as a machine-readable code and a sentence that says how to fix it."""

    code: str = Field(description="Stable error code, e.g. not_an_image, file_too_large, unauthorised.")
    message: str = Field(description="What is wrong and what to do about it.")


class ErrorResponse(BaseModel):
    """Every 4xx answer of the API."""

    error: ErrorBody


class Health(BaseModel):
    """Liveness of the service (no patient data, no authentication)."""

    status: str = Field(description="'ok' while the service answers.")
    model: str = Field(
        description="'current': the model files in service are the ones on disk; 'stale': a changed model file does not "
        "load, so the last good model still answers (see /api/model)."
    )


class Me(BaseModel):
    """The user a token belongs to."""

    user: str


class ModelInfo(BaseModel):
    """The model (or ensemble) that classifies uploads."""

    version: str = Field(description="Model file name(s) and SHA-256 prefix(es); recorded with every case.")
    classes: list[str]
    class_names: dict[str, str] = Field(description="Readable name of every class code.")
    malignant_classes: list[str] = Field(description="Classes that raise the malignancy flag.")
    malignant_threshold: float = Field(description="The flag is also raised when the malignant classes' probabilities sum to at least this.")
    image_size: int = Field(description="Model input side in pixels.")
    ensemble_size: int = Field(description="Number of models whose probabilities are averaged.")
    models: list[dict]
    preprocess: dict
    stale: dict[str, str] = Field(
        description="Model files that changed on disk but do not load, with why; the last good model answers until they are fixed."
    )
    clinical_note: str


class ClassifiedImage(BaseModel):
    """The prediction for one uploaded image, saved as a pending case."""

    case_id: str = Field(description="Server-generated id; use it to confirm or correct the label.")
    upload_position: int = Field(description="0-based position of the image in the request.")
    probabilities: dict[str, float] = Field(description="Probability of every class (sums to 1).")
    top_class: str
    top_probability: float
    malignant_probability: float = Field(description="Sum of the malignant classes' probabilities.")
    malignant: bool = Field(description="Malignancy flag: the top class is malignant, or the malignant classes together reach the threshold.")
    overlay_jpeg_base64: str = Field(description="Grad-CAM overlay of the top class on the model's crop (384 px), base64 JPEG.")
    model_version: str


class ClassifyResponse(BaseModel):
    """Predictions for all images of one request, in upload order."""

    model_version: str
    results: list[ClassifiedImage]
    clinical_note: str


class FeedbackRequest(BaseModel):
    """The clinician's label for a case: the predicted class confirms it, another class corrects it."""

    label: str = Field(description="One of the model's classes.")
    note: str | None = Field(None, max_length=MAX_NOTE_CHARACTERS, description="Optional free-text note.")


class Case(BaseModel):
    """A classified image and what the clinician said about it."""

    case_id: str
    created_at: str
    created_by: str
    model_version: str
    predicted_label: str
    probabilities: dict[str, float]
    status: str = Field(description="pending, confirmed or corrected.")
    label: str | None = Field(description="The clinician's label (None while pending).")
    note: str | None
    reviewed_at: str | None
    reviewed_by: str | None
    image_url: str


class CaseList(BaseModel):
    """Cases newest first, with the number of cases of every status."""

    cases: list[Case]
    counts: dict[str, int]


def _errors(*statuses: int) -> dict:
    """OpenAPI entries for the error answers an endpoint can give."""
    return {status: {"model": ErrorResponse} for status in statuses}


AUTH_ERRORS = _errors(401)


def _case(record: CaseRecord) -> Case:
    values = {key: value for key, value in vars(record).items() if key != "image_path"}
    return Case(**values, image_url=f"/api/cases/{record.case_id}/image")


def _error(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


class ApiError(HTTPException):
    """An HTTP error with a code and a message that says what to do."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None) -> None:
        super().__init__(status_code=status, detail=message, headers=headers)
        self.code = code


# ---- middleware ------------------------------------------------------------------------------


class _BodyTooLarge(Exception):
    pass


UNAUTHORISED_MESSAGE = "sign in with a valid access token (Authorization: Bearer <token>); ask IT for one"
BODY_METHODS = (b"POST", b"PUT", b"PATCH")


class RequestLimits:
    """ASGI middleware: the token of a request with a body checked before the body is read, bodies capped
    (declared or streamed), and security headers on every answer."""

    def __init__(self, app, max_body_bytes: int, token_is_valid: Callable[[str], bool]) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.token_is_valid = token_is_valid

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        started = False
        exceeded = False

        async def send_with_headers(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                extra = [(name.encode(), value.encode()) for name, value in SECURITY_HEADERS.items()]
                if scope["path"].startswith("/api/"):
                    extra.append((b"cache-control", b"no-store"))
                message = {**message, "headers": list(message.get("headers", [])) + extra}
            await send(message)

        too_large = _error(
            413, "request_too_large",
            f"the request is larger than {self.max_body_bytes / 2**20:.0f} MiB; send fewer or smaller images per request",
        )
        replaced = False

        async def send_or_refuse(message):
            # Once the body ran over the limit, whatever the app answers (its body parser turns the
            # interruption into a generic 400) is replaced by the 413 that says what to do.
            nonlocal replaced
            if not exceeded:
                await send_with_headers(message)
            elif not replaced and message["type"] == "http.response.start":
                replaced = True
                await too_large(scope, receive, send_with_headers)

        if scope["path"].startswith("/api/") and scope["method"].encode() in BODY_METHODS:
            # Up to hundreds of MiB of multipart body would be parsed before the endpoint's own token check.
            scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not token or not self.token_is_valid(token):
                await _error(401, "unauthorised", UNAUTHORISED_MESSAGE, {"WWW-Authenticate": "Bearer"})(scope, receive, send_with_headers)
                return
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                if int(declared) > self.max_body_bytes:
                    await too_large(scope, receive, send_with_headers)
                    return
            except ValueError:
                await _error(400, "bad_request", "the Content-Length header is not a number")(scope, receive, send_with_headers)
                return
        received = 0

        async def limited_receive():
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    exceeded = True
                    raise _BodyTooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send_or_refuse)
        except _BodyTooLarge:
            if not started:
                await too_large(scope, receive, send_with_headers)


# ---- the application -------------------------------------------------------------------------


class UserDirectory:
    """The users file, re-read when it changes so that IT's additions and removals apply at once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._users: list[User] = []

    def users(self) -> list[User]:
        """The current users."""
        try:
            status = os.stat(self.path)
            stamp = (status.st_mtime_ns, status.st_size, status.st_ino)
        except FileNotFoundError:
            stamp = None
        with self._lock:
            if stamp != self._stamp or stamp is None:
                self._users = UserList(self.path).users
                self._stamp = stamp
            return self._users


def create_app(settings: WebSettings, classifier: Classifier | None = None) -> FastAPI:
    """The web app for these settings (the classifier is loaded from `settings.models` unless given)."""
    classifier = classifier or Classifier(
        settings.models,
        malignant_classes=settings.malignant_classes,
        malignant_threshold=settings.malignant_threshold,
        device=settings.device,
    )
    store = FeedbackStore(settings.database_path)
    directory = UserDirectory(settings.users_path)
    images_dir = settings.images_dir
    images_dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    app = FastAPI(
        title="skin-fl clinician web app",
        version="1",
        description=(
            "Classify dermoscopic lesion images with the site's federated model, see a Grad-CAM explanation, "
            "and confirm or correct the label; labelled cases become training data for the site's next "
            "federated round. Runs inside the hospital and sends nothing elsewhere. Every /api endpoint except "
            "/api/health needs `Authorization: Bearer <token>` (tokens are issued by IT with `skin-fl-web add-user`). "
            "Errors are JSON: {\"error\": {\"code\", \"message\"}}. " + CLINICAL_NOTE
        ),
        docs_url=None,  # FastAPI's Swagger and ReDoc pages load scripts from a CDN: /api/docs is served locally instead
        redoc_url=None,
    )
    app.state.settings, app.state.classifier, app.state.store = settings, classifier, store
    bearer = HTTPBearer(auto_error=False, description="Token issued by `skin-fl-web add-user`.")

    def current_user(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> User:
        challenge = {"WWW-Authenticate": "Bearer"}
        if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
            raise ApiError(401, "unauthorised", "sign in with the access token IT gave you (Authorization: Bearer <token>)", challenge)
        user = authenticate(directory.users(), credentials.credentials)
        if user is None:
            raise ApiError(401, "unauthorised", "this access token is not valid (mistyped, or withdrawn); ask IT for a new one", challenge)
        return user

    AuthorisedUser = Annotated[User, Depends(current_user)]

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = getattr(error, "code", None) or {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        message = str(error.detail)
        if error.status_code == 404 and code == "not_found" and message == "Not Found":
            message = f"there is no {request.url.path}; see /api/docs for the endpoints"
        return _error(error.status_code, code, message, getattr(error, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in problem['loc'] if part != 'body') or 'request'}: {problem['msg']}"
            for problem in error.errors()
        )
        return _error(422, "invalid_request", f"the request is not valid ({problems}); see /api/docs")

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, error: Exception) -> JSONResponse:
        reference = secrets.token_hex(6)
        logger.error("%s %s failed (reference %s)", request.method, request.url.path, reference, exc_info=error)
        return _error(
            500, "internal_error",
            f"the web app hit an unexpected error; nothing was kept from this request. Tell IT the reference {reference} "
            "(the service log has the details)",
        )

    # ---- pages ---------------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    def classify_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/favicon.ico", include_in_schema=False)
    def no_favicon() -> Response:
        return Response(status_code=204)

    @app.get("/cases", include_in_schema=False)
    def cases_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "cases.html", media_type="text/html")

    @app.get("/api/docs", include_in_schema=False)
    def api_reference() -> HTMLResponse:
        return HTMLResponse(render_api_reference(app.openapi()))

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    # ---- API -----------------------------------------------------------------------------------

    @app.get("/api/health", response_model=Health, summary="Service is up (no authentication, no data)")
    def health() -> Health:
        return Health(status="ok", model="stale" if classifier.stale else "current")

    @app.get("/api/me", response_model=Me, responses=AUTH_ERRORS, summary="The user the token belongs to")
    def me(user: AuthorisedUser) -> Me:
        return Me(user=user.name)

    @app.get("/api/model", response_model=ModelInfo, responses=AUTH_ERRORS, summary="The served model or ensemble")
    def model_info(user: AuthorisedUser) -> ModelInfo:
        classifier.refresh()
        description = classifier.describe()
        names = {name: CLASS_NAMES.get(name, name) for name in description["classes"]}
        return ModelInfo(**description, class_names=names, clinical_note=CLINICAL_NOTE)

    @app.post(
        "/api/classify",
        response_model=ClassifyResponse,
        responses=_errors(400, 401, 413, 415, 422),
        summary="Classify and explain one or many JPEG/PNG images",
        description=(
            "Multipart form with one or more `files` parts. Each image is checked (type, size, dimensions, "
            "complete decoding), kept in the site's data folder under a server-generated name, classified, "
            "explained with Grad-CAM, and recorded as a pending case. One bad file rejects the whole request "
            "and nothing is kept."
        ),
    )
    async def classify(user: AuthorisedUser, files: Annotated[list[UploadFile], File(description="JPEG or PNG images.")]) -> ClassifyResponse:
        if len(files) > settings.max_files:
            raise ApiError(400, "too_many_files", f"{len(files)} images in one request, the limit is {settings.max_files}; send them in smaller groups")
        checked = []
        for position, upload in enumerate(files):
            data = await upload.read(settings.max_upload_bytes + 1)
            try:
                checked.append(
                    check_upload(
                        position, upload.filename, data, max_bytes=settings.max_upload_bytes, max_side=settings.max_image_side,
                        max_pixels=int(settings.max_image_megapixels * 1e6),
                    )
                )
            except UploadRejected as rejection:
                raise ApiError(rejection.status, rejection.code, rejection.message) from rejection
        try:
            check_request_pixels(checked, int(settings.max_request_megapixels * 1e6))
        except UploadRejected as rejection:
            raise ApiError(rejection.status, rejection.code, rejection.message) from rejection
        return await run_in_threadpool(_classify_checked, checked, [upload.filename for upload in files], user)

    def _classify_checked(checked, filenames, user: User) -> ClassifyResponse:
        case_ids = [new_case_id() for _ in checked]
        paths = []
        try:
            for case_id, upload in zip(case_ids, checked):
                paths.append(store_upload(images_dir, case_id, upload))
            try:
                predictions, version = classifier.classify_files(paths)
            except DataError as error:
                bad = next((index for index, path in enumerate(paths) if str(path) in str(error)), None)
                name = describe(bad, filenames[bad]) if bad is not None else "an image"
                raise ApiError(422, "corrupt_image", f"{name} is corrupt or truncated and cannot be decoded; export the image again") from error
            now = utc_now()
            records = [
                CaseRecord(
                    case_id=case_id,
                    image_path=store.relative_image_path(path),
                    created_at=now,
                    created_by=user.name,
                    model_version=version,
                    predicted_label=prediction.top_class,
                    probabilities=prediction.probabilities,
                )
                for case_id, path, prediction in zip(case_ids, paths, predictions)
            ]
            store.add_cases(records)
        except BaseException:
            for path in paths:
                path.unlink(missing_ok=True)  # nothing half-kept: no case rows, so no orphan images either
            raise
        results = [
            ClassifiedImage(
                case_id=case_id,
                upload_position=upload.position,
                probabilities=prediction.probabilities,
                top_class=prediction.top_class,
                top_probability=prediction.top_probability,
                malignant_probability=prediction.malignant_probability,
                malignant=prediction.malignant,
                overlay_jpeg_base64=base64.b64encode(prediction.overlay_jpeg).decode("ascii"),
                model_version=version,
            )
            for case_id, upload, prediction in zip(case_ids, checked, predictions)
        ]
        return ClassifyResponse(model_version=version, results=results, clinical_note=CLINICAL_NOTE)

    @app.post(
        "/api/cases/{case_id}/feedback",
        response_model=Case,
        responses=_errors(401, 404, 422),
        summary="Confirm or correct a case's label",
        description="The predicted class confirms the case, any other class corrects it; sending again replaces the label. "
        "The signed-in user and the time are recorded.",
    )
    def feedback(
        case_id: Annotated[str, PathParameter(pattern=CASE_ID_PATTERN)], body: FeedbackRequest, user: AuthorisedUser
    ) -> Case:
        classes = classifier.classes
        if body.label not in classes:
            raise ApiError(422, "unknown_label", f"label {body.label!r} is not one of the model's classes {classes}; pick one of them")
        note = (body.note or "").strip() or None
        try:
            return _case(store.record_feedback(case_id, label=body.label, note=note, user=user.name))
        except UnknownCase as error:
            raise ApiError(404, "unknown_case", f"there is no case {case_id}; list the cases with GET /api/cases") from error

    @app.get("/api/cases", response_model=CaseList, responses=_errors(401, 422), summary="Past cases, newest first")
    def list_cases(
        user: AuthorisedUser,
        status: Annotated[str | None, Query(pattern=f"^({'|'.join(CASE_STATUSES)})$", description="Only cases of this status.")] = None,
        limit: Annotated[int, Query(ge=1, le=10_000, description="At most this many cases.")] = 500,
    ) -> CaseList:
        return CaseList(cases=[_case(record) for record in store.list_cases(status=status, limit=limit)], counts=store.counts())

    @app.get("/api/cases.csv", responses={200: {"content": {"text/csv": {}}}, **AUTH_ERRORS}, summary="All cases as CSV")
    def export_csv(user: AuthorisedUser) -> Response:
        buffer = io.StringIO()
        store.write_csv(buffer)
        name = f"skin-fl-cases-{utc_now()[:10]}.csv"
        return Response(buffer.getvalue(), media_type="text/csv; charset=utf-8", headers={"content-disposition": f'attachment; filename="{name}"'})

    @app.get("/api/cases/{case_id}", response_model=Case, responses=_errors(401, 404, 422), summary="One case")
    def get_case(case_id: Annotated[str, PathParameter(pattern=CASE_ID_PATTERN)], user: AuthorisedUser) -> Case:
        try:
            return _case(store.get(case_id))
        except UnknownCase as error:
            raise ApiError(404, "unknown_case", f"there is no case {case_id}; list the cases with GET /api/cases") from error

    @app.get(
        "/api/cases/{case_id}/image",
        responses={200: {"content": {"image/jpeg": {}, "image/png": {}}}, **_errors(401, 404, 422)},
        summary="The uploaded image of a case",
    )
    def case_image(case_id: Annotated[str, PathParameter(pattern=CASE_ID_PATTERN)], user: AuthorisedUser) -> FileResponse:
        try:
            record = store.get(case_id)
        except UnknownCase as error:
            raise ApiError(404, "unknown_case", f"there is no case {case_id}; list the cases with GET /api/cases") from error
        path = store.image_file(record)
        if not path.is_file():
            raise ApiError(404, "image_missing", f"the image of case {case_id} is no longer in {images_dir}; restore it from the site's backup")
        return FileResponse(path, media_type="image/png" if path.suffix == ".png" else "image/jpeg")

    app.add_middleware(
        RequestLimits,
        max_body_bytes=settings.max_files * settings.max_upload_bytes + MULTIPART_OVERHEAD_BYTES,
        token_is_valid=lambda token: authenticate(directory.users(), token) is not None,
    )
    return app
