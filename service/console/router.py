"""Serves the console: one HTML page and its static assets, under a strict Content-Security-Policy.

The page holds no data: its scripts call the same public REST API as the SDK, with the key the
user typed (kept in the tab's sessionStorage). So the console can never show what the API would
not, and these routes need no authentication.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, RedirectResponse
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

STATIC = Path(__file__).with_name("static")

# No inline script or style, nothing from another origin; the API is this origin (connect-src).
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'none'; "
       "frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
           "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY"}
RAW_HEADERS = [(k.lower().encode(), v.encode()) for k, v in HEADERS.items()]


class SecurityHeaders:
    """Adds the console's headers to every response of the wrapped ASGI app."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *RAW_HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)


router = APIRouter(include_in_schema=False)


@router.get("/console")
def console_page() -> FileResponse:
    # the page itself is never cached: a new release's assets are picked up on reload
    return FileResponse(STATIC / "index.html", headers={**HEADERS, "Cache-Control": "no-store"})


@router.get("/console/")
def console_slash() -> RedirectResponse:
    return RedirectResponse("/console", status_code=308)


def mount(app: FastAPI) -> None:
    """The page (headers set by its route) and its assets (headers added by the wrapper)."""
    app.include_router(router)
    app.mount("/console/static", SecurityHeaders(StaticFiles(directory=STATIC)), name="console-static")
