"""`judge`: an LLM grades each answer through any OpenAI-compatible chat endpoint.

Requests run concurrently (bounded), are retried on transient errors and cached by prompt hash, so a
trial that produces the same answer as an earlier one costs no request. An answer that holds no JSON
score counts as 0 and is counted in `stats["unparsable"]`; it never stops the search. A request that still
fails after its retries does: a score made of failures would mislead the optimiser, so the trial is not
logged and a re-run continues from the last logged trial (answers so far stay cached).
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import jinja2

from ..errors import UserError, mask_secrets
from ..paths import find_template
from . import Generated
from .llm import TRANSIENT, ChatClient  # noqa: F401  (TRANSIENT re-exported)

JSON_OBJECT = re.compile(r"\{[^{}]*\}")


def parse_score(text: str) -> float | None:
    """The `score` of the first JSON object in the answer, clamped to [0, 1]; None if there is none."""
    for candidate in JSON_OBJECT.findall(text or ""):
        try:
            value = float(json.loads(candidate)["score"])
        except (ValueError, KeyError, TypeError):
            continue
        return min(max(value, 0.0), 1.0)
    return None


class JudgeClient(ChatClient):
    def __init__(self, cfg):
        super().__init__(cfg, "evaluation.judge")


class Judge(Generated):
    def __init__(self, *args):
        super().__init__(*args)
        jcfg = self.cfg.judge

        path = find_template(jcfg.prompt_template)
        self.template = jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(path.read_text())
        self.client = JudgeClient(jcfg)
        self.cache: dict[str, str] = {}
        self.stats.update({"unparsable": 0, "requests": 0, "errors": 0})  # beside the evaluator's own (truncated)
        self._failure = threading.Event()  # set, with its .message, by the first request that fails

    def _ask(self, prompt: str) -> str:
        key = hashlib.sha256(f"{self.cfg.judge.model}\0{prompt}".encode()).hexdigest()
        if key not in self.cache and self._failure.is_set():  # one failure stops every further request
            raise UserError(self._failure.message)
        if key not in self.cache:
            self.stats["requests"] += 1
            try:
                self.cache[key] = self.client.complete(prompt)
            except Exception as e:
                self.stats["errors"] += 1
                self._failure.message = mask_secrets(
                    f"evaluation.judge: {self.cfg.judge.base_url} failed after {self.cfg.judge.retries} retries "
                    f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); this trial is not logged; "
                    f"re-run when the endpoint answers to continue where it stopped")
                self._failure.set()
                raise UserError(self._failure.message) from None
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
