"""The FastAPI application of `dinov2-serve`: the page, its static assets and the JSON API.

Routes:

- ``GET /``: the page (``static/index.html``); ``GET /static/...``: its JS and CSS.
- ``GET /api/health``: model, classes, backbone, device, reference_size (and the upload limit).
- ``POST /api/predict``: multipart field ``files`` (one or many) -> one JSON object per file, in
  upload order (see `ImageResult.to_json`).
- ``POST /api/predict.csv``: the same predictions as the CSV `dinov2-infer --csv` writes.
- ``GET /api/reference/{index}/thumbnail``: a small PNG of reference cell ``index``.

Bad input: an undecodable file gets its own ``"error"`` (status 200 for the batch); a file over
``max_upload_mb`` or a request over ``max_request_mb`` is a 413, an upload without files a 400,
a request without Content-Length a 411. The interactive API docs are switched off: FastAPI's
load their scripts from a CDN, and the app makes no external request. A Content-Security-Policy
header tells the browser the same (everything from this origin, images also from data:/blob:).

Example::

    app = create_app(ClassifierService.from_checkpoint("best.pth"), max_upload_mb=20)
    uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import io
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from dinov2.serve.service import ClassifierService, ImageResult, Upload
from dinov2.transfer.predictions import write_predictions_rows

STATIC_DIR = Path(__file__).resolve().parent / "static"
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'"
)
MIB = 1024 * 1024


def _megabytes(n_bytes: int) -> str:
    return f"{n_bytes / MIB:.1f} MB"


def create_app(
    service: ClassifierService,
    *,
    max_upload_mb: float = 20.0,
    max_request_mb: float | None = None,
    max_files: int = 256,
) -> FastAPI:
    """The app serving ``service``.

    Args:
        service: the loaded classifier.
        max_upload_mb: largest accepted file (MiB); a larger one makes the request a 413.
        max_request_mb: largest accepted request body (MiB, from Content-Length, checked before
            anything is read); default ``max(256, max_upload_mb)``.
        max_files: most files in one request (more is a 400).
    """
    if max_upload_mb <= 0 or max_files < 1:
        raise ValueError(f"need max_upload_mb > 0 and max_files >= 1, got {max_upload_mb}, {max_files}")
    max_file_bytes = int(max_upload_mb * MIB)
    max_request_bytes = int(
        (max_request_mb if max_request_mb is not None else max(256.0, max_upload_mb)) * MIB
    )
    if max_request_bytes < max_file_bytes:
        raise ValueError(f"max_request_mb ({max_request_mb}) must be >= max_upload_mb ({max_upload_mb})")
    index_html = (STATIC_DIR / "index.html").read_text(encoding="utf-8")

    app = FastAPI(title="dinov2-serve", docs_url=None, redoc_url=None)
    app.state.service = service
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    async def read_uploads(request: Request) -> list[Upload]:
        length = request.headers.get("content-length")
        if length is None:
            raise HTTPException(411, "send the upload with a Content-Length header")
        if not length.isdigit():
            raise HTTPException(400, f"invalid Content-Length {length!r}")
        if int(length) > max_request_bytes:
            raise HTTPException(
                413, f"request of {_megabytes(int(length))} is over the {_megabytes(max_request_bytes)} limit"
            )
        form = await request.form(max_files=max_files, max_fields=max_files)
        try:
            uploads = []
            for item in form.getlist("files"):
                if not isinstance(item, UploadFile):
                    raise HTTPException(400, "the multipart field 'files' must hold files, not text")
                if not item.filename and not item.size:
                    continue  # what a browser sends for an empty file chooser
                if item.size is not None and item.size > max_file_bytes:
                    raise HTTPException(
                        413,
                        f"{item.filename} is {_megabytes(item.size)}, over the {max_upload_mb:g} MB limit "
                        "(dinov2-serve --max-upload-mb)",
                    )
                uploads.append(Upload(item.filename or "", await item.read()))
        finally:
            await form.close()
        if not uploads:
            raise HTTPException(
                400, "no files uploaded: send one or more images in the multipart field 'files'"
            )
        return uploads

    async def predict_uploads(request: Request) -> list[ImageResult]:
        uploads = await read_uploads(request)
        # The model blocks: run it in the thread pool so the server keeps answering meanwhile.
        return await run_in_threadpool(service.predict, uploads)

    @app.get("/", response_class=HTMLResponse)
    def page() -> HTMLResponse:
        return HTMLResponse(index_html)

    @app.get("/api/health")
    def health() -> dict:
        return {**service.health(), "max_upload_mb": max_upload_mb, "max_files": max_files}

    @app.post("/api/predict")
    async def predict(request: Request) -> JSONResponse:
        results = await predict_uploads(request)
        return JSONResponse([r.to_json() for r in results])

    @app.post("/api/predict.csv")
    async def predict_csv(request: Request) -> Response:
        results = await predict_uploads(request)
        text = io.StringIO(newline="")
        write_predictions_rows(text, [r.prediction for r in results], service.classes)
        return Response(
            text.getvalue(),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": 'attachment; filename="predictions.csv"'},
        )

    @app.get("/api/reference/{index}/thumbnail")
    def reference_thumbnail(index: int) -> Response:
        try:
            png = service.reference_thumbnail(index)
        except LookupError as e:
            raise HTTPException(404, str(e)) from e
        except (ValueError, OSError) as e:  # moved or unreadable reference file
            raise HTTPException(404, f"reference image {index} is unavailable: {e}") from e
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    return app
