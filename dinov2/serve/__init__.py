"""A local web app for a trained cell classifier (`dinov2-serve`, issue 16).

One stage on top of `dinov2.eval`: it serves a classifier checkpoint written by `dinov2-finetune`
(the ``best.pth`` that `dinov2-infer` reads) to a page and a JSON API.

- `service`: `ClassifierService` loads the checkpoint once and predicts uploaded files (classes,
  attention of the CLS and register tokens, pooled embeddings) under one lock, without gradients.
- `retrieval`: `ReferenceIndex`, cosine-similarity search over the embeddings of a labeled
  reference set (computed once through the feature cache of `dinov2.eval.features`).
- `overlay`: attention maps blended over the image as PNG data URLs.
- `app`: `create_app`, the FastAPI application (page, static assets, API).
- `static/`: the page's HTML, JS and CSS, served by the app itself (no CDN, works offline).

The command line lives in `dinov2.run.serve`. Importing this package loads nothing heavy; FastAPI is
imported by `dinov2.serve.app` only.
"""
