"""Uploaded files, received as a stream: each file part goes straight to a temporary file.

The request body is parsed while it arrives (python-multipart's streaming parser), hashed on
the way, and refused with 413 as soon as a file passes `score.max_bytes`: an oversize upload
costs at most that many bytes of disk, never memory, and is never read to its end. Uploads are
bytes on disk for the image loader; nothing here unpickles, imports or executes them.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

# Headers and small form fields of a multipart body; anything bigger is not a form we serve.
MAX_FIELD_BYTES = 64 * 1024
MAX_FILES = 32


class UploadError(Exception):
    """The request body is not an upload we accept; `status` is the HTTP answer (400/413/422)."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class Upload:
    """One received file: where its bytes are, their sha256 and the name the client gave."""

    filename: str  # the client's file name, base name only, safe to show
    path: Path  # temporary file holding the bytes (removed by `discard`)
    size: int = 0
    sha256: str = ""
    _hash: "hashlib._Hash" = field(default_factory=hashlib.sha256, repr=False)


def display_name(raw: str | None) -> str:
    """The base name of a client-supplied file name, with control and path characters replaced."""
    name = re.split(r"[\\/]", raw or "")[-1]
    name = re.sub(r"[\x00-\x1f\x7f<>\"'`]", "_", name).strip() or "upload"
    return name[:200]


async def receive_files(request: Request, tmp_dir: Path, max_bytes: int, field_name: str = "file") -> list[Upload]:
    """Stream a multipart/form-data body into temporary files, one per part named `field_name`.

    Raises UploadError: 413 when a file passes `max_bytes` (or the declared body length could
    only hold such a file), 400/422 for a body that is not multipart form data or has no file.
    On any error every temporary file written so far is removed.
    """
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or not options.get(b"boundary"):
        raise UploadError(422, f"send the file as multipart/form-data in the field '{field_name}'")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_FILES * (max_bytes + MAX_FIELD_BYTES):
        raise UploadError(413, f"the request of {int(declared)} bytes is over the upload limit "
                               f"({max_bytes} bytes per file, score.max_bytes)")
    uploads: list[Upload] = []
    state = {"field": b"", "value": b"", "current": None, "handle": None, "error": None}

    def on_part_begin():
        state["disposition"] = b""

    def on_header_field(data, start, end):
        state["field"] += data[start:end]

    def on_header_value(data, start, end):
        state["value"] += data[start:end]
        if len(state["value"]) > MAX_FIELD_BYTES:
            raise UploadError(400, "a multipart header is too long")

    def on_header_end():
        if state["field"].lower() == b"content-disposition":
            state["disposition"] = state["value"]
        state["field"], state["value"] = b"", b""

    def on_headers_finished():
        _, opts = parse_options_header(state["disposition"])
        name, filename = opts.get(b"name", b"").decode("utf-8", "replace"), opts.get(b"filename")
        state["current"] = None
        if name != field_name or filename is None:
            state["skipped"] = 0  # another form field: read and forget, bounded
            return
        if len(uploads) >= MAX_FILES:
            raise UploadError(413, f"at most {MAX_FILES} files per request")
        fd, tmp = tempfile.mkstemp(prefix="upload-", suffix=".bin", dir=tmp_dir)
        upload = Upload(display_name(filename.decode("utf-8", "replace")), Path(tmp))
        uploads.append(upload)
        state["current"], state["handle"] = upload, os.fdopen(fd, "wb")

    def on_part_data(data, start, end):
        upload = state["current"]
        if upload is None:
            state["skipped"] = state.get("skipped", 0) + end - start
            if state["skipped"] > MAX_FIELD_BYTES:
                raise UploadError(413, "a form field is too long")
            return
        upload.size += end - start
        if upload.size > max_bytes:
            raise UploadError(413, f"the file '{upload.filename}' is over the limit of {max_bytes} bytes "
                                   "(score.max_bytes); it was not read further")
        chunk = data[start:end]
        upload._hash.update(chunk)
        state["handle"].write(chunk)

    def on_part_end():
        if state["handle"] is not None:
            state["handle"].close()
            state["handle"] = None
            state["current"].sha256 = state["current"]._hash.hexdigest()

    boundary = options[b"boundary"]
    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished, "on_part_data": on_part_data,
        "on_part_end": on_part_end})
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except UploadError:
        discard(uploads, state)
        raise
    except Exception as exc:  # the parser's own errors: a malformed body, not a server fault
        discard(uploads, state)
        raise UploadError(400, f"the request body is not valid multipart form data ({type(exc).__name__})") from None
    if state["handle"] is not None or any(not u.sha256 for u in uploads):
        discard(uploads, state)
        raise UploadError(400, "the request body ended in the middle of a file")
    if not uploads:
        raise UploadError(422, f"no file in the form field '{field_name}'")
    return uploads


def discard(uploads: list[Upload], state: dict | None = None) -> None:
    """Remove the temporary files of `uploads` (an open one is closed first)."""
    if state and state.get("handle") is not None:
        state["handle"].close()
        state["handle"] = None
    for upload in uploads:
        upload.path.unlink(missing_ok=True)
