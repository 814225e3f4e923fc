"""Stand-in of FastAPI (0.94, the version AUTOMATIC1111 v1.10.1 pins) for the routes the DreamBooth
LoRA extension adds to the webui's app: ``FastAPI.add_api_route``, ``Request`` (headers, body,
json), ``HTTPException``. ``call`` plays a request against the registered routes (path parameters
in braces, the request injected by its annotation, an HTTPException turned into its status and
detail). Test support only, not FastAPI."""

import asyncio
import inspect
import json as json_module
import re


class HTTPException(Exception):
    def __init__(self, status_code, detail=None, headers=None):
        super().__init__(detail)
        self.status_code, self.detail, self.headers = status_code, detail, headers


class Request:
    def __init__(self, body=b"", headers=None):
        self._body = body
        self.headers = {k.lower(): v for k, v in (headers or {}).items()}

    async def body(self):
        return self._body

    async def json(self):
        return json_module.loads(self._body)


class Route:
    def __init__(self, path, endpoint, methods):
        self.path, self.endpoint, self.methods = path, endpoint, set(methods)
        self.pattern = re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", path) + "$")


class FastAPI:
    def __init__(self):
        self.routes = []

    def add_api_route(self, path, endpoint, *, methods=None, response_model=None, dependencies=None, **kwargs):
        self.routes.append(Route(path, endpoint, methods or ["GET"]))

    def call(self, method, path, json=None, headers=None):
        """(status, body) of one request."""
        body = b"" if json is None else json_module.dumps(json).encode()
        for route in self.routes:
            match = route.pattern.match(path)
            if match and method in route.methods:
                kwargs = dict(match.groupdict())
                for name, parameter in inspect.signature(route.endpoint).parameters.items():
                    if parameter.annotation is Request:
                        kwargs[name] = Request(body, headers)
                try:
                    result = route.endpoint(**kwargs)
                    if inspect.iscoroutine(result):
                        result = asyncio.run(result)
                except HTTPException as err:
                    return err.status_code, {"detail": err.detail}
                return 200, json_module.loads(json_module.dumps(result))
        return 404, {"detail": "Not Found"}
