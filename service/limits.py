"""The request body cap (MAX_BODY_BYTES), enforced before the body is parsed.

A declared `Content-Length` over the cap is answered 413 at once, without reading the body; a
body without one (chunked) is counted as it arrives, and the read that passes the cap raises
`BodyTooLarge`, an HTTPException, so FastAPI answers 413 through the app's handler (in OpenAI's
envelope on /v1) before any JSON is parsed.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse



class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"The request body is over this server's limit of {limit} bytes (MAX_BODY_BYTES).")


def too_large(path: str, limit: int) -> JSONResponse:
    message = BodyTooLarge(limit).detail
    if path.startswith("/v1/"):
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                       "code": "request_too_large"}}, status_code=413)
    return JSONResponse({"detail": message}, status_code=413)


class BodySizeLimit:
    """413 for a request whose body is over `limit` bytes (see the module's docstring)."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((value for name, value in scope["headers"] if name == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await too_large(scope["path"], self.limit)(scope, receive, send)
            return
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, counted, send)
