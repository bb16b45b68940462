"""HTTP API: FastAPI over RecommendationService (`recsys serve` runs it under uvicorn).

The recommendation endpoint is `async` and answers with JSON it serializes itself: the
fill is CPU-only microseconds, so a thread hop or response-model re-validation would cost
more than the work. The pydantic models still document the response in OpenAPI. Events
do storage I/O, so that endpoint runs in the thread pool. Every client mistake is a 4xx
with a message saying what to change (ids must fit int64, as every table stores them); a
body over `max_body_bytes` is refused before it is parsed, a request without the right
bearer token before its body is validated (`serving/auth.py`).

The docs work offline: Swagger UI's files come from the `fastapi-swagger` package (a
packaged Swagger UI distribution that follows its releases), served under /docs/assets, not
from a CDN. `surface` and `region` are enums in the schema, built per app from its
Settings; they are documentation only, so an unknown value still gets the service's own
404/422 message. (No `from __future__ import annotations` here: FastAPI reads the endpoint
annotations at runtime, and the per-app models are local names.)
"""

import hashlib
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, MutableMapping
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StringConstraints,
    WithJsonSchema,
    create_model,
    model_validator,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from recsys_assets.channels.attribution import (
    CLICK_PATH,
    ENGAGEMENT_TYPES,
    OPEN_PATH,
    AttributionError,
    TrackingNotConfigured,
    click_landing_url_from_env,
    landing_url,
)
from recsys_assets.config import Settings
from recsys_assets.rules.person import OPT_IN_EVENTS
from recsys_assets.serving.auth import (
    ADMIN,
    EVENTS_WRITE,
    RECOMMENDATIONS_READ,
    TOKENS_ENV_VAR,
    ApiTokens,
    allows,
)
from recsys_assets.serving.kills import KillError, KillScope
from recsys_assets.serving.rerank import MAX_SESSION_ITEMS
from recsys_assets.serving.service import SERVED_FROM, RecommendationService, ServingRequestError
from recsys_assets.serving.state import EVENT_TYPES, INT64_MAX, InvalidEvent, ServingEvent

log = logging.getLogger(__name__)

TRACKING_TOKEN_PATTERN = "^[0-9a-f]{64}$"
TRANSPARENT_GIF = bytes.fromhex(
    "47494638396101000100800000000000ffffff21f90401000000002c00000000010001000002024401003b"
)
"""A 1×1 transparent GIF: the open pixel's answer."""
NO_STORE = {"Cache-Control": "no-store"}

DEFAULT_MAX_BODY_BYTES = 16 * 1024
DOCS_ASSETS_PATH = "/docs/assets"
SWAGGER_UI_PACKAGE = ("fastapi_swagger", "resources")
"""Where Swagger UI's swagger-ui-bundle.js, swagger-ui.css and favicon are installed."""

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class ItemOut(BaseModel):
    item_id: int
    position: int = Field(description="1-based position in this response")
    score: float | None = Field(
        ge=0,
        le=1,
        description="Calibrated probability that the subject engages with the item. Null "
        "where no model scored it: fallback items, and lists published before the "
        "probability was stored.",
    )
    utility: float | None = Field(
        description="What the personalized list was ranked by: the calibrated probability "
        "plus novelty, sponsored and exploration boosts. Not a probability (can exceed 1); "
        "null for fallback items.",
    )
    fallback_score: float | None = Field(
        description="A fallback item's ranking value on its list's own scale: weighted "
        "positive interactions in the region over 14 days for popular_by_region and "
        "new_user_default (0 for the newest items that fill a short list), 1/rank for a "
        "tenant's default actions. Null for personalized items.",
    )
    reason_codes: list[str]
    source_provenance: list[str]


class ExperimentOut(BaseModel):
    id: str
    arm: str


class RecommendationOut(BaseModel):
    request_id: str
    subject_id: int
    surface: str
    region: str
    list_id: str | None
    version: str | None
    served_from: Literal[SERVED_FROM]  # type: ignore[valid-type]
    generated_at: str | None
    expires_at: str | None
    model_version: str | None
    items: list[ItemOut]
    rejections: dict[str, int] = Field(description="Items refused by the final check, by reason")
    experiment: ExperimentOut | None = Field(
        None,
        description="The subject's arm when the surface runs an experiment, else null",
    )


class KillIn(BaseModel):
    """What to take off the air: a surface, one region of it, or a campaign's items."""

    model_config = ConfigDict(extra="forbid")

    surface: str = Field(min_length=1, max_length=100)
    region: str | None = Field(None, min_length=1, max_length=100)
    campaign: str | None = Field(
        None, min_length=1, max_length=200, description="campaign_id: remove its items only"
    )
    reason: str = Field(min_length=1, max_length=500, description="Why: goes into the audit")
    allow_unknown_campaign: StrictBool = Field(
        False,
        description="Kill a campaign no catalog item carries yet (a pre-emptive kill); "
        "without it such a campaign is refused with 422",
    )


class LiftIn(BaseModel):
    """The exact scope of an active kill to lift."""

    model_config = ConfigDict(extra="forbid")

    surface: str = Field(min_length=1, max_length=100)
    region: str | None = Field(None, min_length=1, max_length=100)
    campaign: str | None = Field(None, min_length=1, max_length=200)
    reason: str | None = Field(None, min_length=1, max_length=500)


class KillOut(BaseModel):
    surface: str
    region: str | None
    campaign: str | None
    reason: str
    actor: str
    killed_at: str


class KillsOut(BaseModel):
    kills: list[KillOut]


class KillsUnavailableOut(BaseModel):
    error: str = Field(description="The kills file and what is wrong with it")
    kills: list[KillOut] = Field(description="The kills this process still enforces")


class EventIn(BaseModel):
    """A user action: effective on the next request and persisted under serving/events/."""

    model_config = ConfigDict(extra="forbid")

    type: Literal[EVENT_TYPES]  # type: ignore[valid-type]
    # Strict: a JSON true, "1" or 1.0 is not an id (lax mode made true user 1).
    user_id: StrictInt = Field(ge=0, le=INT64_MAX)
    item_id: StrictInt | None = Field(None, ge=0, le=INT64_MAX)
    creator_id: str | None = Field(None, min_length=1, max_length=200)
    category: str | None = Field(None, min_length=1, max_length=200)
    surface: str | None = Field(None, max_length=100)
    region: str | None = Field(None, max_length=100)
    ts: datetime | None = Field(None, description="When it happened (UTC); default: now")


class EngagementIn(BaseModel):
    """An open or a click of a sent email or push, attributed by its tracking token.

    The token is the credential: no bearer token is needed (docs/CHANNELS.md).
    """

    model_config = ConfigDict(extra="forbid")

    type: Literal[ENGAGEMENT_TYPES]  # type: ignore[valid-type]
    tracking_token: str = Field(
        pattern=TRACKING_TOKEN_PATTERN, description="The item's token from the message (hex HMAC)"
    )
    item_id: StrictInt | None = Field(
        None, ge=0, le=INT64_MAX, description="click only: must be the token's item"
    )

    @model_validator(mode="after")
    def _item_on_clicks_only(self) -> "EngagementIn":
        if self.type == "open" and self.item_id is not None:
            raise ValueError("an open event carries no item_id")
        return self


def _one_of(values: Iterable[str]) -> WithJsonSchema:
    """A string documented as one of `values` (validated by the service, with its message)."""
    return WithJsonSchema({"type": "string", "enum": list(values)})


def _configured_models(settings: Settings) -> tuple[type[RecommendationOut], type[EventIn]]:
    """RecommendationOut and EventIn whose surface and region list this app's configuration."""
    surfaces, regions = _one_of(settings.surfaces), _one_of(settings.regions)
    name = StringConstraints(max_length=100)
    recommendation = create_model(
        "RecommendationOut",
        __base__=RecommendationOut,
        surface=(Annotated[str, surfaces], ...),
        region=(Annotated[str, regions], ...),
    )
    event = create_model(
        "EventIn",
        __base__=EventIn,
        surface=(Annotated[str, name, surfaces] | None, None),
        region=(Annotated[str, name, regions] | None, None),
    )
    return recommendation, event


class EventAccepted(BaseModel):
    accepted: int
    """Events stored: 0 for the repeat of an open or click already counted."""
    path: str | None
    """Where they were stored; null when nothing new was."""


class ErrorOut(BaseModel):
    error: str
    detail: list[dict[str, Any]] | None = None


class BodySizeLimit:
    """Refuse request bodies over `max_bytes` with 413, before anything parses them."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        payload = json.dumps(
            {"error": f"request body too large: the limit is {self.max_bytes} bytes"}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})


def _describe(errors: list[dict[str, Any]]) -> str:
    parts = []
    for error in errors:
        where = ".".join(str(part) for part in error.get("loc", ()) if part != "body") or "body"
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


_bearer = HTTPBearer(auto_error=False)
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


class RequireScope:
    """A dependency that returns the caller's scopes, or answers 401 / 403.

    The tokens are the app's (`app.state.tokens`). Without configured tokens, a read is
    open and a write is refused.
    """

    def __init__(self, scope: str, *, open_when_unconfigured: bool) -> None:
        self.scope = scope
        self.open_when_unconfigured = open_when_unconfigured

    async def __call__(self, request: Request, credentials: Credentials) -> frozenset[str]:
        tokens: ApiTokens = request.app.state.tokens
        if not tokens.configured:
            if self.open_when_unconfigured:
                return frozenset()
            raise HTTPException(
                401,
                f"writes need a bearer token and none is configured: set {TOKENS_ENV_VAR}",
                headers=_CHALLENGE,
            )
        if credentials is None:
            raise HTTPException(
                401, "missing bearer token: send 'Authorization: Bearer TOKEN'", headers=_CHALLENGE
            )
        scopes = tokens.scopes_of(credentials.credentials)
        if scopes is None:
            raise HTTPException(401, "unknown bearer token", headers=_CHALLENGE)
        if not allows(scopes, self.scope):
            raise HTTPException(403, f"this token lacks the {self.scope!r} scope")
        return scopes


read_access = RequireScope(RECOMMENDATIONS_READ, open_when_unconfigured=True)
SINGLE_VALUED_QUERY = ("subject_id", "region", "limit", "category_intent")
"""The recommendation route's scalar query parameters (session_item_ids repeats by design)."""


def single_valued_query(request: Request) -> None:
    """A scalar query parameter given twice is a 422 naming it: FastAPI would otherwise
    answer for the last value, silently serving e.g. another subject than the first
    `subject_id` a client (or an attacker appending one) wrote."""
    repeated = [name for name in SINGLE_VALUED_QUERY if len(request.query_params.getlist(name)) > 1]
    if repeated:
        raise RequestValidationError(
            [
                {"loc": ("query", name), "msg": "given more than once", "type": "value_error"}
                for name in repeated
            ]
        )


write_access = RequireScope(EVENTS_WRITE, open_when_unconfigured=False)
admin_access = RequireScope(ADMIN, open_when_unconfigured=False)


async def admin_actor(request: Request, credentials: Credentials) -> str:
    """Check the `admin` scope; return who acts, for the audit: a fingerprint of the token
    (its SHA-256, shortened), never the token itself."""
    await admin_access(request, credentials)
    assert credentials is not None  # admin_access refused a request without one
    return "token:" + hashlib.sha256(credentials.credentials.encode()).hexdigest()[:12]


AdminActor = Annotated[str, Depends(admin_actor)]


async def event_access(request: Request, credentials: Credentials) -> frozenset[str]:
    """An open or click needs no bearer token (its verified tracking token is the
    credential, and its body can only be an open or a click); every other event type needs
    `events:write`, checked before the body is validated, as before."""
    try:
        body = json.loads(await request.body())
    except (UnicodeDecodeError, ValueError):
        body = None
    if isinstance(body, dict) and body.get("type") in ENGAGEMENT_TYPES:
        return frozenset()
    return await write_access(request, credentials)


WriteScopes = Annotated[frozenset[str], Depends(event_access)]


def create_app(
    service: RecommendationService | None = None,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    tokens: ApiTokens | None = None,
    metrics_public: bool = False,
) -> FastAPI:
    """The serving app. Without `service`, one is built from the environment and the app
    owns it: started with the app, closed (decision log flushed) at shutdown.

    `tokens` (default: not configured, the development default) decide who may call what;
    `metrics_public` opens /metrics without a token.
    """
    owned = service is None
    serving = service or RecommendationService()
    click_landing = click_landing_url_from_env()
    recommendation_model, EventBody = _configured_models(serving.settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        serving.start()
        try:
            yield
        finally:
            if owned:
                serving.close()

    app = FastAPI(
        title="recsys serving",
        description="Precomputed recommendations with a final online check, fallback lists "
        "and a serving decision log.",
        version="1",
        lifespan=lifespan,
        docs_url=None,  # served below from the packaged Swagger UI, not a CDN
        redoc_url=None,  # ReDoc would load from a CDN; Swagger UI is the documented viewer
        swagger_ui_oauth2_redirect_url=None,  # bearer tokens only, no OAuth2 flow
    )
    app.state.service = serving
    app.state.tokens = tokens or ApiTokens.unconfigured()
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    app.mount(
        DOCS_ASSETS_PATH,
        StaticFiles(packages=[SWAGGER_UI_PACKAGE]),
        name="swagger_ui_assets",
    )

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{DOCS_ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_ASSETS_PATH}/favicon-32x32.png",
        )

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        details = [
            {key: value for key, value in item.items() if key in ("loc", "msg", "type")}
            for item in error.errors()
        ]
        return JSONResponse({"error": _describe(details), "detail": details}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            {"error": str(error.detail)},
            status_code=error.status_code,
            headers=getattr(error, "headers", None),
        )

    @app.exception_handler(ServingRequestError)
    async def bad_request(request: Request, error: ServingRequestError) -> JSONResponse:
        return JSONResponse({"error": str(error)}, status_code=error.status_code)

    @app.exception_handler(AttributionError)
    async def unattributable(request: Request, error: AttributionError) -> JSONResponse:
        return JSONResponse({"error": str(error)}, status_code=error.status_code)

    @app.exception_handler(KillError)
    async def bad_kill(request: Request, error: KillError) -> JSONResponse:
        return JSONResponse({"error": str(error)}, status_code=error.status_code)

    @app.exception_handler(InvalidEvent)
    async def bad_event(request: Request, error: InvalidEvent) -> JSONResponse:
        return JSONResponse({"error": f"invalid event: {error}"}, status_code=422)

    errors: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorOut} for code in (401, 403, 404, 413, 422)
    }

    @app.get(
        "/v1/recommendations/{surface}",
        response_model=recommendation_model,
        responses=errors,
        summary="Recommendations for one subject on one surface",
        dependencies=[Depends(read_access), Depends(single_valued_query)],
    )
    async def recommendations(
        surface: Annotated[str, Path(), _one_of(serving.settings.surfaces)],
        subject_id: Annotated[
            int, Query(ge=0, le=INT64_MAX, description="user_id of the recipient")
        ],
        region: Annotated[
            str, Query(min_length=1, max_length=100), _one_of(serving.settings.regions)
        ],
        limit: Annotated[
            int | None, Query(ge=1, description="at most the surface's display_count")
        ] = None,
        session_item_ids: Annotated[
            list[Annotated[int, Field(ge=0, le=INT64_MAX)]] | None,
            Query(
                max_length=MAX_SESSION_ITEMS,
                description="candidate_pool_rerank: items of this session (repeat the key)",
            ),
        ] = None,
        category_intent: Annotated[
            str | None,
            Query(min_length=1, max_length=200, description="candidate_pool_rerank: a category"),
        ] = None,
    ) -> Response:
        context: dict[str, Any] = {}
        if session_item_ids:
            context["session_item_ids"] = session_item_ids
        if category_intent is not None:
            context["category_intent"] = category_intent
        recommendation = serving.recommend(
            subject_id, surface, region, limit=limit, context=context or None
        )
        return Response(
            json.dumps(recommendation.to_dict(), separators=(",", ":")),
            media_type="application/json",
        )

    @app.post(
        "/v1/events",
        response_model=EventAccepted,
        status_code=202,
        responses={**errors, 503: {"model": ErrorOut}},
        summary="Report a hide, exposure, purchase, consent or subscription change, or a "
        "message open / click",
        description="Opens and clicks (`tracking_token` from the message) need no bearer "
        "token: the token is verified against the send it belongs to; unknown → 404, not "
        "verifying → 403. Every other type needs `events:write`; opting in (`consent_granted`, "
        "`email_subscribed`, `push_enabled`) needs `admin`.",
    )
    def events(
        event: Annotated[EventBody | EngagementIn, Field(discriminator="type")],  # type: ignore[valid-type]
        scopes: WriteScopes,
    ) -> Any:
        if isinstance(event, EngagementIn):
            try:
                path = serving.record_engagement(
                    event.type, event.tracking_token, item_id=event.item_id
                )
            except AttributionError:
                raise
            except Exception as error:
                log.exception("cannot persist engagement event")
                return JSONResponse(
                    {"error": f"event not recorded, storage unavailable ({error}); retry later"},
                    status_code=503,
                )
            return EventAccepted(accepted=0 if path is None else 1, path=path)
        if event.type in OPT_IN_EVENTS and not allows(scopes, ADMIN):
            return JSONResponse(
                {"error": f"a {event.type} event needs a token with the 'admin' scope"},
                status_code=403,
            )
        try:
            path = serving.record_events([ServingEvent(**event.model_dump())])
        except InvalidEvent:
            raise
        except Exception as error:
            log.exception("cannot persist serving event")
            return JSONResponse(
                {"error": f"event not recorded, storage unavailable ({error}); retry later"},
                status_code=503,
            )
        return EventAccepted(accepted=1, path=path)

    def attribute_link(event_type: str, token: str, item_id: int | None) -> None:
        """Record an open or click followed from a message. What does not attribute (unknown,
        forged, malformed token; wrong item) is logged, never recorded, and answered like a
        real one, so a link scanner learns nothing about which tokens are valid."""
        if not re.fullmatch(TRACKING_TOKEN_PATTERN, token):
            log.info("tracking link: malformed %s token not recorded", event_type)
            return
        try:
            serving.record_engagement(event_type, token, item_id=item_id)
        except TrackingNotConfigured as error:
            log.warning("tracking link: %s not recorded: %s", event_type, error)
        except AttributionError as error:
            log.info("tracking link: %s not recorded: %s", event_type, error)
        except Exception:
            log.exception("tracking link: cannot persist %s event", event_type)

    @app.get(
        f"{OPEN_PATH}/{{token}}",
        response_class=Response,
        responses={200: {"content": {"image/gif": {}}, "description": "1×1 transparent GIF"}},
        summary="Open pixel of a sent email (no bearer token: the tracking token is verified)",
        description="Records the open once per token, as `POST /v1/events` does. Always "
        "answers the GIF with `Cache-Control: no-store`; a token that does not attribute is "
        "not recorded (docs/CHANNELS.md).",
    )
    def open_pixel(token: str) -> Response:
        attribute_link("open", token, None)
        return Response(TRANSPARENT_GIF, media_type="image/gif", headers=NO_STORE)

    @app.get(
        f"{CLICK_PATH}/{{token}}",
        response_class=Response,
        status_code=302,
        responses={204: {"description": "clicked; RECSYS_CLICK_LANDING_URL is not set"}},
        summary="Click link of a sent email or push (no bearer token: the tracking token is "
        "verified)",
        description="Records the click once per token, as `POST /v1/events` does, then "
        "redirects (302) to `RECSYS_CLICK_LANDING_URL` with `/<item_id>` appended when given, "
        "or answers 204 without a landing URL. A token that does not attribute is redirected "
        "the same way and not recorded (docs/CHANNELS.md).",
    )
    def click_link(
        token: str,
        item_id: Annotated[
            int | None, Query(ge=0, le=INT64_MAX, description="the clicked item")
        ] = None,
    ) -> Response:
        attribute_link("click", token, item_id)
        if click_landing is None:
            return Response(status_code=204, headers=NO_STORE)
        return Response(
            status_code=302,
            headers={"Location": landing_url(click_landing, item_id), **NO_STORE},
        )

    @app.post(
        "/v1/admin/kill",
        response_model=KillOut,
        status_code=201,
        responses=errors,
        summary="Kill a surface, a region of it, or a campaign's items, at once",
        description="Needs the `admin` scope. A killed surface or region is served from "
        "the fallback lists (`served_from: killed_fallback`); a killed campaign's items are "
        "removed and the fill takes the next ones. Effective on the next request here and "
        "within the manifest poll interval in every other serving process; audited in the "
        "decision log. 422 for a region the surface is not configured for, a campaign no "
        "item carries (unless `allow_unknown_campaign`) or control characters in `reason`; "
        "503 while the kills file is damaged or unreadable (nothing is changed).",
    )
    def kill(body: KillIn, actor: AdminActor) -> Any:
        scope = KillScope(body.surface, body.region, body.campaign)
        killed = serving.kill(
            scope,
            reason=body.reason,
            actor=actor,
            allow_unknown_campaign=body.allow_unknown_campaign,
        )
        return killed.to_dict()

    @app.delete(
        "/v1/admin/kill",
        response_model=KillOut,
        responses=errors,
        summary="Lift the kill of exactly this scope",
        description="Needs the `admin` scope; 404 when no kill of that scope is active, 503 "
        "while the kills file is damaged or unreadable (nothing is lifted).",
    )
    def lift(body: LiftIn, actor: AdminActor) -> Any:
        scope = KillScope(body.surface, body.region, body.campaign)
        return serving.lift(scope, actor=actor, reason=body.reason).to_dict()

    @app.get(
        "/v1/admin/kill",
        response_model=KillsOut,
        responses={**errors, 503: {"model": KillsUnavailableOut}},
        summary="The kills in force",
        description="Needs the `admin` scope. Re-reads the kills file; 503 naming the problem "
        "while it is damaged or unreadable, with the kills this process still enforces.",
        dependencies=[Depends(admin_access)],
    )
    def kills() -> Any:
        switch = serving.kill_switch
        switch.refresh()
        enforced = [kill.to_dict() for kill in switch.active.kills]
        if switch.problem is not None:
            return JSONResponse({"error": switch.problem, "kills": enforced}, status_code=503)
        return {"kills": enforced}

    @app.get(
        "/metrics",
        summary="Prometheus metrics",
        response_class=Response,
        dependencies=[] if metrics_public else [Depends(read_access)],
    )
    async def metrics() -> Response:
        return Response(serving.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz", summary="Readiness: 503 with the reasons when requests cannot be answered")
    async def healthz() -> JSONResponse:
        ready, detail = serving.health()
        return JSONResponse(detail, status_code=200 if ready else 503)

    return app
