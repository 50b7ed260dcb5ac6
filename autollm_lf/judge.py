"""`judge`: an LLM grades each answer through any OpenAI-compatible chat endpoint.

Requests run concurrently (bounded), are retried on transient errors and cached by prompt hash, so a
trial that produces the same answer as an earlier one costs no request. An answer that holds no JSON
score counts as 0 and is counted in `stats["unparsable"]`; it never stops the search.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor

import jinja2

from .errors import UserError
from .evaluate import Generated

JSON_OBJECT = re.compile(r"\{[^{}]*\}")
TRANSIENT = {429, 500, 502, 503, 504}


def parse_score(text: str) -> float | None:
    """The `score` of the first JSON object in the answer, clamped to [0, 1]; None if there is none."""
    for candidate in JSON_OBJECT.findall(text or ""):
        try:
            value = float(json.loads(candidate)["score"])
        except (ValueError, KeyError, TypeError):
            continue
        return min(max(value, 0.0), 1.0)
    return None


class JudgeClient:
    def __init__(self, cfg):
        import httpx

        self.cfg = cfg
        headers = {}
        if cfg.api_key_env:
            key = os.environ.get(cfg.api_key_env)
            if not key:
                raise UserError(f"evaluation.judge.api_key_env: environment variable {cfg.api_key_env} is not set; "
                                f"export it with the endpoint's API key")
            headers["Authorization"] = f"Bearer {key}"  # read from the environment, never written anywhere
        self.http = httpx.Client(base_url=cfg.base_url.rstrip("/"), headers=headers, timeout=cfg.timeout)
        self.check()

    def check(self) -> None:
        import httpx

        try:
            self.http.get("/models").raise_for_status()
        except httpx.HTTPError as e:
            raise UserError(f"evaluation.judge.base_url: no answer from {self.cfg.base_url} ({type(e).__name__}: {e}); "
                            f"start the server or fix the URL") from None

    def complete(self, prompt: str) -> str:
        import httpx

        body = {"model": self.cfg.model, "messages": [{"role": "user", "content": prompt}],
                "temperature": 0, "max_tokens": self.cfg.max_tokens}
        for attempt in range(self.cfg.retries + 1):
            try:
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


class Judge(Generated):
    def __init__(self, *args):
        super().__init__(*args)
        jcfg = self.cfg.judge
        from .train import find_template

        path = find_template(jcfg.prompt_template)
        self.template = jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(path.read_text())
        self.client = JudgeClient(jcfg)
        self.cache: dict[str, str] = {}
        self.stats = {"unparsable": 0, "requests": 0, "errors": 0}

    def _ask(self, prompt: str) -> str:
        key = hashlib.sha256(f"{self.cfg.judge.model}\0{prompt}".encode()).hexdigest()
        if key not in self.cache:
            self.stats["requests"] += 1
            try:
                self.cache[key] = self.client.complete(prompt)
            except Exception as e:  # a failed request scores 0 and is counted; the search goes on
                self.stats["errors"] += 1
                return f"request failed: {e}"
        return self.cache[key]

    def row_scores(self) -> list[float]:
        preds = self.predictions()
        prompts = [self.template.render(prompt=r["prompt"], reference=r["response"], prediction=p, row=r)
                   for p, r in zip(preds, self.rows)]
        with ThreadPoolExecutor(max_workers=self.cfg.judge.concurrency) as pool:
            answers = list(pool.map(self._ask, prompts))
        scores = []
        for answer in answers:
            s = parse_score(answer)
            if s is None:
                self.stats["unparsable"] += 1
                s = 0.0
            scores.append(s)
        return scores
