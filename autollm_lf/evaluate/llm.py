"""The one OpenAI-compatible chat client (httpx): API key from an environment variable, a reachability
check, retries with backoff on transient errors. Used by the LLM judge and by the `generate` source."""
from __future__ import annotations

import os
import time

from ..errors import UserError

TRANSIENT = {429, 500, 502, 503, 504}


class ChatClient:
    """`cfg` holds base_url, model, api_key_env, timeout, retries, max_tokens (and optionally temperature);
    `where` is its config key path, named in every error."""

    def __init__(self, cfg, where: str, check: bool = True):
        import httpx

        self.cfg, self.where = cfg, where
        headers = {}
        if cfg.api_key_env:
            key = os.environ.get(cfg.api_key_env)
            if not key:
                raise UserError(f"{where}.api_key_env: environment variable {cfg.api_key_env} is not set; "
                                f"export it with the endpoint's API key")
            headers["Authorization"] = f"Bearer {key}"  # read from the environment, never written anywhere
        self.http = httpx.Client(base_url=cfg.base_url.rstrip("/"), headers=headers, timeout=cfg.timeout)
        self.requests = 0
        if check:
            self.check()

    def check(self) -> None:
        import httpx

        try:
            self.http.get("/models").raise_for_status()
        except httpx.HTTPError as e:
            raise UserError(f"{self.where}.base_url: no answer from {self.cfg.base_url} ({type(e).__name__}: {e}); "
                            f"start the server or fix the URL") from None

    def complete(self, prompt: str) -> str:
        import httpx

        body = {"model": self.cfg.model, "messages": [{"role": "user", "content": prompt}],
                "temperature": getattr(self.cfg, "temperature", 0), "max_tokens": self.cfg.max_tokens}
        for attempt in range(self.cfg.retries + 1):
            try:
                self.requests += 1
                r = self.http.post("/chat/completions", json=body)
                if r.status_code in TRANSIENT and attempt < self.cfg.retries:
                    raise httpx.HTTPStatusError("transient", request=r.request, response=r)
                r.raise_for_status()
                return r.json()["choices"][0]["message"]["content"] or ""
            except (httpx.TransportError, httpx.HTTPStatusError):
                if attempt == self.cfg.retries:
                    raise
                time.sleep(0.5 * 2 ** attempt)
        raise AssertionError("unreachable")
