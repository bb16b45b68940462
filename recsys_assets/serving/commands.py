"""`recsys recommend` (one request, printed as JSON), `recsys serve` (the HTTP API) and
`recsys kill` (the kill switch, as `POST/DELETE /v1/admin/kill` without a server)."""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import socket
from typing import Any

from recsys_assets.config import load_settings
from recsys_assets.serving import service as service_module
from recsys_assets.serving.auth import ApiTokens
from recsys_assets.serving.kills import Kill, KillScope, KillSwitch
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

    kill = subparsers.add_parser(
        "kill",
        help="kill (or --lift) a surface, a region of it, or a campaign, without a republish",
        description="Take a surface (every region, or --region R) off its lists: served from "
        "the fallback lists, served_from killed_fallback. With --campaign C, remove that "
        "campaign's items only. Written to the warehouse (serving/kills.json): every serving "
        "process applies it within serving.manifest_poll_interval_s; audited in the serving "
        "decision log. --lift removes the kill of exactly that scope; --list shows the kills "
        "in force (only those of --surface / --region / --campaign when given). A damaged or "
        "unreadable kills file is an error (exit 2) naming the file and the problem.",
    )
    kill.add_argument("--surface", help="a configured surface (required unless --list)")
    kill.add_argument("--region", help="only this region of the surface")
    kill.add_argument("--campaign", help="only this campaign_id's items")
    kill.add_argument("--reason", help="why (required to kill; recorded in the audit trail)")
    kill.add_argument(
        "--allow-unknown-campaign",
        action="store_true",
        help="kill a --campaign no item in raw/items carries yet (a pre-emptive kill)",
    )
    action = kill.add_mutually_exclusive_group()
    action.add_argument("--lift", action="store_true", help="lift the kill of this scope")
    action.add_argument("--list", action="store_true", help="print the kills in force")
    kill.set_defaults(handler=_kill)


def _recommend(args: argparse.Namespace) -> int:
    service = RecommendationService(Warehouse.from_env())
    service.check_request(args.surface, args.region, args.limit)
    if not getattr(args, "verbose", False):  # the top-level flag (absent in direct calls)
        # One answer on stdout: the store's per-version "loaded" lines are for servers.
        logging.getLogger(service_module.__name__).setLevel(logging.WARNING)
    service.load()
    try:
        if not service.kill_switch.ever_read:  # answering would ignore every kill
            raise ValueError(f"kill switch: {service.kill_switch.problem}")
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
    # A server that cannot read the kills would serve killed surfaces: refuse to start.
    KillSwitch(Warehouse.from_env(), load_settings()).read()
    uvicorn.run(
        create_app(tokens=tokens, metrics_public=args.metrics_public),
        host=args.host,
        port=args.port,
        access_log=args.access_log,
        log_level="info",
    )
    return 0


def _kill(args: argparse.Namespace) -> int:
    if args.list:
        return _list_kills(args)
    if not args.surface:
        raise ValueError("--surface is required (or --list)")
    service = RecommendationService(Warehouse.from_env())
    try:
        scope = KillScope(args.surface, args.region, args.campaign)
        actor = f"cli:{getpass.getuser()}@{socket.gethostname()}"
        if args.lift:
            lifted = service.lift(scope, actor=actor, reason=args.reason)
            print(json.dumps({"lifted": lifted.to_dict()}, indent=2))
        else:
            if not args.reason:
                raise ValueError("--reason is required to kill (it goes into the audit trail)")
            killed = service.kill(
                scope,
                reason=args.reason,
                actor=actor,
                allow_unknown_campaign=args.allow_unknown_campaign,
            )
            print(json.dumps({"killed": killed.to_dict()}, indent=2))
    finally:
        service.close()  # writes the audit row
    return 0


def _list_kills(args: argparse.Namespace) -> int:
    """The kills in the file now, those matching every filter given; an unreadable file
    raises KillsUnavailable (exit 2), never an empty list."""
    if args.reason is not None or args.allow_unknown_campaign:
        raise ValueError("--list takes only --surface, --region and --campaign (filters)")
    kills = KillSwitch(Warehouse.from_env(), load_settings()).read()
    wanted = {"surface": args.surface, "region": args.region, "campaign": args.campaign}

    def matches(kill: Kill) -> bool:
        return all(value is None or getattr(kill, key) == value for key, value in wanted.items())

    print(json.dumps({"kills": [kill.to_dict() for kill in kills if matches(kill)]}, indent=2))
    return 0
