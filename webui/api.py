"""HTTP routes on the webui's FastAPI app, for automation and headless tests:

    POST /dreambooth-lora/train                  body: a training request (jobs.py) → the run
    GET  /dreambooth-lora/runs                   every run, newest first
    GET  /dreambooth-lora/runs/{id}              status, step/total, losses, ETA, previews, error
    POST /dreambooth-lora/runs/{id}/cancel       stop after the current step, keep a checkpoint
                                                 (body {"now": true}: quit at once, as a second Ctrl-C)
    POST /dreambooth-lora/runs/{id}/resume       body (optional): {"steps": N} → a new run
    GET  /dreambooth-lora/environment            the training interpreter, or why there is none

A bad request is answered 422 with one sentence that starts with the field's name; an unknown run
404; a run that cannot start now (the environment is missing, another run holds the GPU) 409.
When the webui runs with ``--api-auth``, these routes ask for the same credentials as its own.
"""

import base64
import binascii
import secrets
from typing import Callable

from ..errors import UserError

PREFIX = "/dreambooth-lora"


class Routes:
    """The route functions, over ``extension`` (extension.py: ``train``, ``runs``, ``environment``)."""

    def __init__(self, extension, credentials: Callable[[], dict]):
        self.extension, self.credentials = extension, credentials

    def check_auth(self, request) -> None:
        from fastapi import HTTPException

        allowed = self.credentials()
        if not allowed:
            return
        header = request.headers.get("authorization", "")
        scheme, _, encoded = header.partition(" ")
        try:
            user, _, password = base64.b64decode(encoded).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            user = password = ""
        if scheme.lower() != "basic" or not any(
                secrets.compare_digest(user, u) and secrets.compare_digest(password, p) for u, p in allowed.items()):
            raise HTTPException(status_code=401, detail="Incorrect username or password",
                                headers={"WWW-Authenticate": "Basic"})

    @staticmethod
    async def body(request) -> dict:
        from fastapi import HTTPException

        raw = await request.body()
        if not raw.strip():
            return {}
        try:
            return await request.json()
        except ValueError:
            raise HTTPException(status_code=422, detail="request: the body is not JSON.") from None

    def run_or_404(self, run_id: str) -> dict:
        from fastapi import HTTPException

        try:
            return self.extension.runs.status(run_id)
        except KeyError:
            raise HTTPException(status_code=404, detail=f"run {run_id!r}: no such run.") from None

    def start(self, make_command: Callable[[], object]) -> dict:
        from fastapi import HTTPException

        try:
            command = make_command()
        except UserError as err:
            raise HTTPException(status_code=422, detail=str(err)) from None
        try:
            return self.extension.runs.start(command)
        except UserError as err:
            raise HTTPException(status_code=409, detail=str(err)) from None

    # --- the routes -----------------------------------------------------------------------------

    async def train(self, request):
        self.check_auth(request)
        payload = await self.body(request)
        return self.start(lambda: self.extension.train_command(payload))

    async def list_runs(self, request):
        self.check_auth(request)
        return {"runs": self.extension.runs.list()}

    async def get_run(self, run_id: str, request):
        self.check_auth(request)
        return self.run_or_404(run_id)

    async def cancel(self, run_id: str, request):
        self.check_auth(request)
        self.run_or_404(run_id)
        payload = await self.body(request)
        return self.extension.runs.cancel(run_id, now=isinstance(payload, dict) and payload.get("now") is True)

    async def resume(self, run_id: str, request):
        from fastapi import HTTPException

        self.check_auth(request)
        self.run_or_404(run_id)
        payload = await self.body(request)
        steps = payload.get("steps") if isinstance(payload, dict) else None
        if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
            raise HTTPException(status_code=422, detail=f"steps: {steps!r} is not a whole number of at least 1.")
        return self.start(lambda: self.extension.runs.resume_command(run_id, steps))

    async def environment(self, request):
        self.check_auth(request)
        return self.extension.environment_status()


def register(app, extension, credentials: Callable[[], dict]) -> Routes:
    """Add the routes to the webui's FastAPI ``app`` (its on_app_started callback)."""
    from fastapi import Request

    routes = Routes(extension, credentials)

    # FastAPI reads parameter annotations to inject the request and path parameters.
    async def train(request: Request):
        return await routes.train(request)

    async def list_runs(request: Request):
        return await routes.list_runs(request)

    async def get_run(run_id: str, request: Request):
        return await routes.get_run(run_id, request)

    async def cancel(run_id: str, request: Request):
        return await routes.cancel(run_id, request)

    async def resume(run_id: str, request: Request):
        return await routes.resume(run_id, request)

    async def environment(request: Request):
        return await routes.environment(request)

    app.add_api_route(f"{PREFIX}/train", train, methods=["POST"])
    app.add_api_route(f"{PREFIX}/runs", list_runs, methods=["GET"])
    app.add_api_route(f"{PREFIX}/runs/{{run_id}}", get_run, methods=["GET"])
    app.add_api_route(f"{PREFIX}/runs/{{run_id}}/cancel", cancel, methods=["POST"])
    app.add_api_route(f"{PREFIX}/runs/{{run_id}}/resume", resume, methods=["POST"])
    app.add_api_route(f"{PREFIX}/environment", environment, methods=["GET"])
    return routes
