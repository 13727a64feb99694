"""`sslsegment review-web`: the review page in a browser, served by this process against a running backend."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("review-web", help="serve the review page (trame-slicer) against a running backend; "
                                          "127.0.0.1 by default")
    p.add_argument("--backend", required=True, help="the backend's URL, e.g. http://127.0.0.1:8765")
    p.add_argument("--token-file", default=None,
                   help="file holding the backend's API token (default: $SSLSEGMENT_TOKEN_FILE, else the token in "
                        "$SSLSEGMENT_TOKEN); it stays in this process and never reaches the browser")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--annotator", default="anonymous", help="name stored with each correction")
    p.add_argument("--work-dir", default=None,
                   help="downloaded cases and local copies of submissions (default: a folder in the system's "
                        "temporary folder)")
    p.add_argument("--page-token-file", default=None,
                   help="where the page's access token is written (default: WORK_DIR/page-token); used when the "
                        "page is bound beyond loopback or with --require-page-token")
    p.add_argument("--require-page-token", action="store_true",
                   help="ask for the page token on loopback too (always asked beyond loopback)")
    p.set_defaults(func=cmd_review_web)


def _backend_token(args) -> str:
    from SSLSegmentLib.web.access import read_token_file
    from training.cli import CommandError

    path = args.token_file or os.environ.get("SSLSEGMENT_TOKEN_FILE")
    if path:
        return read_token_file(path)
    token = os.environ.get("SSLSEGMENT_TOKEN", "").strip()
    if not token:
        raise CommandError("give the backend's token: --token-file FILE (`sslsegment token --datastore DIR > FILE` "
                           "on the backend's machine), or SSLSEGMENT_TOKEN_FILE / SSLSEGMENT_TOKEN")
    return token


def cmd_review_web(args) -> int:
    from training.cli import CommandError

    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    try:
        from SSLSegmentLib.web.app import ReviewWebApp
    except ImportError as exc:
        raise CommandError(f"the review page needs trame-slicer: pip install 'sslsegment[web]' ({exc})") from None
    from SSLSegmentLib.review.client import SSLSegmentClient
    from SSLSegmentLib.review.session import ReviewSession
    from SSLSegmentLib.web.access import PageAccess, create_page_token, is_loopback

    token = _backend_token(args)
    work_dir = Path(args.work_dir) if args.work_dir else Path(tempfile.gettempdir()) / "sslsegment-web"
    work_dir.mkdir(parents=True, exist_ok=True)
    session = ReviewSession(SSLSegmentClient(args.backend, token=token), work_dir, annotator=args.annotator)

    url = f"http://{args.host}:{args.port}/"
    if args.require_page_token or not is_loopback(args.host):
        token_path = Path(args.page_token_file) if args.page_token_file else work_dir / "page-token"
        access = PageAccess(create_page_token(token_path))
        if not is_loopback(args.host):
            print(f"warning: listening on {args.host}, reachable from other machines; use TLS in front of it",
                  flush=True)
        print(f"review page on {url}?access=TOKEN, TOKEN in {token_path} (owner only)", flush=True)
    else:
        access = PageAccess(None)
        print(f"review page on {url} (this machine only)", flush=True)
    app = ReviewWebApp(session, access)
    app.serve(host=args.host, port=args.port)
    return 0
