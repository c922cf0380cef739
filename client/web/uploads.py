"""Checking uploaded images before anything is kept: type, size, dimensions; storing them under server-chosen names."""

from __future__ import annotations

import io
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from shared.durable_files import write_bytes_atomically

ACCEPTED_FORMATS = {"JPEG": ".jpg", "PNG": ".png"}
"""Formats the web app accepts, and the extension it stores each under."""


class UploadRejected(ValueError):
    """An upload the web app refuses: `status` is the HTTP status, the message says what is wrong and what to do."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass
class CheckedUpload:
    """An upload whose header says it is a JPEG or PNG of acceptable size."""

    position: int
    data: bytes
    format: str
    width: int
    height: int

    @property
    def extension(self) -> str:
        """File extension the image is stored under."""
        return ACCEPTED_FORMATS[self.format]


def describe(position: int, filename: str | None) -> str:
    """How an error names an upload: its position, and its name as the browser sent it (shown, never used as a path)."""
    shown = (filename or "").replace("\n", " ").replace("\r", " ")[:80]
    return f"file {position + 1}" + (f" ({shown!r})" if shown else "")


def check_upload(
    position: int, filename: str | None, data: bytes, *, max_bytes: int, max_side: int, max_pixels: int
) -> CheckedUpload:
    """The upload's format and size from its header, or `UploadRejected` naming the problem and the fix.

    Nothing is decoded here: the pixel caps apply before any image's pixels take memory, and
    PIL's decompression-bomb guard is turned into the same 413.
    """
    name = describe(position, filename)
    if not data:
        raise UploadRejected(400, "empty_file", f"{name} is empty; choose a JPEG or PNG image")
    if len(data) > max_bytes:
        raise UploadRejected(
            413, "file_too_large",
            f"{name} is {len(data) / 2**20:.1f} MiB, over the limit of {max_bytes / 2**20:.1f} MiB; "
            "export the image at a lower resolution or ask IT to raise max-upload-mb",
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as opened:
                image_format, (width, height) = opened.format, opened.size
    except (UnidentifiedImageError, Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
        if isinstance(error, UnidentifiedImageError):
            raise UploadRejected(415, "not_an_image", f"{name} is not a JPEG or PNG image; choose a dermoscopy photograph in JPEG or PNG") from error
        raise UploadRejected(413, "image_too_large", f"{name} has too many pixels to decode safely; export it at a lower resolution") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise UploadRejected(422, "corrupt_image", f"{name} cannot be read ({error}); export the image again") from error
    if image_format not in ACCEPTED_FORMATS:
        raise UploadRejected(
            415, "unsupported_format", f"{name} is a {image_format} image; only JPEG and PNG are accepted, convert it first"
        )
    if max(width, height) > max_side:
        raise UploadRejected(
            413, "image_too_large",
            f"{name} is {width}x{height} pixels, over the limit of {max_side} on its longest side; "
            "export it at a lower resolution or ask IT to raise max-image-side",
        )
    if width * height > max_pixels:
        raise UploadRejected(
            413, "image_too_large",
            f"{name} is {width}x{height} pixels ({width * height / 1e6:.2f} million), over the limit of "
            f"{max_pixels / 1e6:.2f} million; export it at a lower resolution or ask IT to raise max-image-megapixels",
        )
    if min(width, height) < 1:
        raise UploadRejected(422, "corrupt_image", f"{name} has no pixels ({width}x{height}); export the image again")
    return CheckedUpload(position=position, data=data, format=image_format, width=width, height=height)


def check_request_pixels(uploads: list[CheckedUpload], max_pixels: int) -> None:
    """Refuse (413) a request whose images together have more pixels than `max_pixels`."""
    total = sum(upload.width * upload.height for upload in uploads)
    if total > max_pixels:
        raise UploadRejected(
            413, "request_too_many_pixels",
            f"the {len(uploads)} images have {total / 1e6:.2f} million pixels together, over the limit of "
            f"{max_pixels / 1e6:.2f} million per request; send fewer images per request or ask IT to raise max-request-megapixels",
        )


def new_case_id() -> str:
    """A random case id (also the stored image's name): never derived from the upload."""
    return uuid.uuid4().hex


def store_upload(images_dir: Path, case_id: str, upload: CheckedUpload) -> Path:
    """Write the upload's bytes unchanged to `<images_dir>/<case_id>.<ext>` (atomically, owner-only)."""
    images_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    target = images_dir / f"{case_id}{upload.extension}"
    write_bytes_atomically(target, upload.data, mode=0o600)
    return target
