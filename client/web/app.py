"""The clinician web app (FastAPI): JSON API to classify, explain and label images, and the plain HTML pages on top.

The API models live in `client.web.schemas`, the error format in `client.web.errors`, the request limits and
security headers in `client.web.middleware`, users and tokens in `client.web.users`; this module holds the routes.
"""

import base64
import io
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, File, Query, UploadFile
from fastapi import Path as PathParameter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles

from client.web.api_docs import render_api_reference
from client.web.errors import ApiError, install_error_handlers
from client.web.inference import Classifier
from client.web.middleware import RequestLimits
from client.web.schemas import (
    AUTH_ERRORS,
    Case,
    CaseList,
    ClassifiedImage,
    ClassifyResponse,
    FeedbackRequest,
    Health,
    Me,
    ModelInfo,
    errors_for,
)
from client.web.settings import WebSettings
from client.web.store import CaseRecord, FeedbackStore, UnknownCase, utc_now
from client.web.uploads import UploadRejected, check_request_pixels, check_upload, describe, new_case_id, store_upload
from client.web.users import User, UserDirectory, authenticate
from shared.data.feedback import CASE_STATUSES
from shared.errors import DataError

STATIC_DIR = Path(__file__).parent / "static"
CASE_ID_PATTERN = r"^[0-9a-f]{32}$"
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
def _case(record: CaseRecord) -> Case:
    values = {key: value for key, value in vars(record).items() if key != "image_path"}
    return Case(**values, image_url=f"/api/cases/{record.case_id}/image")


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
    install_error_handlers(app)

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
        responses=errors_for(400, 401, 413, 415, 422),
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
        responses=errors_for(401, 404, 422),
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

    @app.get("/api/cases", response_model=CaseList, responses=errors_for(401, 422), summary="Past cases, newest first")
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

    @app.get("/api/cases/{case_id}", response_model=Case, responses=errors_for(401, 404, 422), summary="One case")
    def get_case(case_id: Annotated[str, PathParameter(pattern=CASE_ID_PATTERN)], user: AuthorisedUser) -> Case:
        try:
            return _case(store.get(case_id))
        except UnknownCase as error:
            raise ApiError(404, "unknown_case", f"there is no case {case_id}; list the cases with GET /api/cases") from error

    @app.get(
        "/api/cases/{case_id}/image",
        responses={200: {"content": {"image/jpeg": {}, "image/png": {}}}, **errors_for(401, 404, 422)},
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
