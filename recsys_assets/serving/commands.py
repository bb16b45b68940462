"""`recsys recommend` (one request, printed as JSON) and `recsys serve` (the HTTP API)."""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from recsys_assets.serving import service as service_module
from recsys_assets.serving.auth import ApiTokens
from recsys_assets.serving.service import RecommendationService
from recsys_assets.warehouse import Warehouse


def register(subparsers: Any) -> None:
    recommend = subparsers.add_parser(
        "recommend",
        help="serve one request in-process and print the response as JSON",
        description="Answer one recommendation request from the published lists (final "
        "check, fill, fallback) and print the response. The decision is logged like any other.",
    )
    recommend.add_argument("--subject", type=int, required=True, help="user_id of the recipient")
    recommend.add_argument("--surface", required=True, help="a configured surface")
    recommend.add_argument("--region", required=True, help="a configured region")
    recommend.add_argument("--limit", type=int, help="at most the surface's display_count")
    recommend.set_defaults(handler=_recommend)

    serve = subparsers.add_parser(
        "serve",
        help="run the HTTP API (FastAPI under uvicorn)",
        description="Serve GET /v1/recommendations/{surface}, POST /v1/events, /metrics, "
        "/healthz and the OpenAPI docs at /docs. Bearer tokens come from RECSYS_API_TOKENS "
        "(TOKEN:SCOPE[+SCOPE],... with scopes events:write, recommendations:read, admin); "
        "without it every write is refused and reads are open (development default).",
    )
    serve.add_argument(
        "--host", default="127.0.0.1", help="interface to bind (default: %(default)s)"
    )
    serve.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    serve.add_argument("--access-log", action="store_true", help="log every request")
    serve.add_argument(
        "--metrics-public",
        action="store_true",
        help="serve /metrics without a token (default: it needs recommendations:read)",
    )
    serve.set_defaults(handler=_serve)


def _recommend(args: argparse.Namespace) -> int:
    service = RecommendationService(Warehouse.from_env())
    service.check_request(args.surface, args.region, args.limit)
    if not getattr(args, "verbose", False):  # the top-level flag (absent in direct calls)
        # One answer on stdout: the store's per-version "loaded" lines are for servers.
        logging.getLogger(service_module.__name__).setLevel(logging.WARNING)
    service.load()
    try:
        recommendation = service.recommend(
            args.subject, args.surface, args.region, limit=args.limit
        )
    finally:
        service.close()
    print(json.dumps(recommendation.to_dict(), indent=2))
    return 0


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from recsys_assets.serving.api import create_app

    tokens = ApiTokens.from_env()  # a malformed RECSYS_API_TOKENS stops here, naming the entry
    uvicorn.run(
        create_app(tokens=tokens, metrics_public=args.metrics_public),
        host=args.host,
        port=args.port,
        access_log=args.access_log,
        log_level="info",
    )
    return 0
