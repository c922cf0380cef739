"""The web app's JSON API models: what every endpoint answers, and the error body of every 4xx answer."""

from pydantic import BaseModel, Field

MAX_NOTE_CHARACTERS = 2000


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


def errors_for(*statuses: int) -> dict:
    """OpenAPI entries for the error answers an endpoint can give."""
    return {status: {"model": ErrorResponse} for status in statuses}


AUTH_ERRORS = errors_for(401)
