"""Tiny fixtures built on the fly (no downloads): a 2-layer Llama with a char tokenizer, LoRA adapters with
non-zero B (init_lora_weights=False) so merges are really tested."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import torch
import yaml

from autollm_lf.data.toy import build_source_db
from autollm_lf.merge import MERGE_METHODS, ties_norm_sum, ties_sum

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)

REPO = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config, items):
    """Plain `pytest` is the fast loop: tests marked slow (real trainings, servers, a real model) run only with
    RUN_SLOW=1, LLaMA-Factory's own convention (`sh autollm.sh test` sets it and runs everything)."""
    if os.environ.get("RUN_SLOW", "").lower() in ("1", "true", "yes"):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


@pytest.fixture
def run_autollm():
    """`autollm run` on a config dict (written to cwd), through the real CLI; returns the run dir."""
    def run(cfg: dict, cwd: Path) -> Path:
        path = cwd / f"{cfg['name']}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        res = subprocess.run([sys.executable, "-m", "autollm_lf", "run", str(path)], cwd=cwd, capture_output=True,
                             text=True, timeout=1200)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
        return cwd / "runs" / cfg["name"]
    return run


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from autollm_lf.models.tiny import make_tiny_llama
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def make_adapter(base_path: Path, out: Path, seed: int, r: int = 4, alpha: int = 8,
                 targets=("q_proj", "v_proj", "down_proj")) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_path)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                                            init_lora_weights=False, lora_dropout=0.0))
    with torch.no_grad():  # make B large enough that each delta changes the logits clearly
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(20.0)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_adapters(tiny_model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a": make_adapter(tiny_model, root / "a", seed=1, r=4, alpha=8),
        "b": make_adapter(tiny_model, root / "b", seed=2, r=8, alpha=8),
        "c": make_adapter(tiny_model, root / "c", seed=3, r=2, alpha=16, targets=("q_proj", "k_proj", "up_proj")),
    }


def in_place_and_exported_logits(w, weights, base_path: Path, out: Path):
    """The logits of two token rows with `weights` set in place on the loaded merge `w`, and from the adapter
    `w.export` writes to `out`, loaded afresh on the base as a user loads it (an exact merge: the two agree)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 17, 33, 40, 71, 2, 9], [40, 41, 42, 5, 6, 7, 8]])
    w.export(weights, out)
    with torch.no_grad():
        w.set_weights(weights)
        in_place = w.model(input_ids=ids).logits
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), str(out)).eval()
        return in_place, loaded(input_ids=ids).logits


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def llamafactory_api(tiny_model, tmp_path_factory):
    """`llamafactory-cli api` serving the tiny model on 127.0.0.1."""
    cfg = tmp_path_factory.mktemp("api") / "api.yaml"
    cfg.write_text(yaml.safe_dump({"model_name_or_path": str(tiny_model), "template": "default",
                                   "infer_backend": "huggingface", "trust_remote_code": True}))
    port = free_port()
    cli = Path(sys.executable).with_name("llamafactory-cli")
    env = dict(os.environ, API_HOST="127.0.0.1", API_PORT=str(port), DISABLE_VERSION_CHECK="1")
    log = open(cfg.with_suffix(".log"), "w")
    proc = subprocess.Popen([str(cli), "api", str(cfg)], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 180
    while True:
        assert proc.poll() is None, cfg.with_suffix(".log").read_text()[-3000:]
        try:
            if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, "llamafactory-cli api did not come up"
        time.sleep(1)
    yield url
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


@contextlib.contextmanager
def chat_stub(answer, fail_after: int | None = None, fail_first: bool = False):
    """An OpenAI-compatible chat endpoint on 127.0.0.1: `answer(prompt) -> text`; after `fail_after` answered
    requests every POST gets a 503 (an endpoint that stops answering mid-way); `fail_first`: the first POST
    gets a 503 (a busy endpoint: the client retries). Every request is logged in state["calls"] as
    (method, Authorization header). Yields (base_url, state)."""
    state = {"posts": 0, "answered": 0, "fail_after": fail_after, "fail_first": fail_first, "calls": []}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, code, body):
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            state["calls"].append(("GET", self.headers.get("Authorization")))
            self._send(200, {"data": [{"id": "m"}]})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state["posts"] += 1
            state["calls"].append(("POST", self.headers.get("Authorization")))
            if state["fail_first"]:
                state["fail_first"] = False
                return self._send(503, {"error": "busy"})
            if state["fail_after"] is not None and state["answered"] >= state["fail_after"]:
                return self._send(503, {"error": "down"})
            state["answered"] += 1
            text = answer(body["messages"][0]["content"])
            self._send(200, {"choices": [{"message": {"role": "assistant", "content": text}}]})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", state
    finally:
        server.shutdown()


# ---- the e2e runs' shared pieces (the real CLI on a tiny model) ------------------------------------------

def autollm(*args, cwd):
    return subprocess.run([sys.executable, "-m", "autollm_lf", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=900)


def write_config(tmp_path, tiny_model, name="e2e", search=None, baselines=True, **train_args):
    """A run on the tiny model; `baselines=False` leaves out train@all and train@auto_mix (two trainings) for
    tests about something else."""
    db = tmp_path / "src.sqlite"
    if not db.exists():
        build_source_db(db, seed=1, rows_per_task=24)
    cfg = {
        "name": name, "seed": 0, "base_model": {"path": str(tiny_model), "template": "default"},
        "data": {"sources": [{"type": "sql", "url": f"sqlite:///{db}",
                              "query": "SELECT id, task, prompt, response FROM examples "
                                       "WHERE task IN ('math', 'code')"}],
                 "chunk_by": "task", "validation_per_chunk": 6, "test_per_chunk": 6},
        "train": {"args": {"num_train_epochs": 1.0, "per_device_train_batch_size": 4, "logging_steps": 1,
                           "learning_rate": 0.01, **train_args},
                  **({} if baselines else {"train_all": False, "auto_mix": False})},
        "search": {"init_points": 2, "n_iter": 3, "human_weights": {"math": 0.5}, **(search or {})},
        "evaluation": {"batch_size": 8},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# ---- the merge methods' reference: dense, stacked, no streaming, no caching (tiny and real-model tests) ---

def ref_magnitude(d, density):
    k = int(density * d.numel())
    mask = torch.zeros(d.numel(), dtype=torch.bool)
    mask[torch.argsort(d.abs().view(-1), descending=True)[:k]] = True
    return d * mask.view_as(d)


def ref_random(d, density, seed):
    keep = torch.rand(d.shape, generator=torch.Generator().manual_seed(seed)) < density
    return d * keep / density


def true_delta(layer, name, scaling, method):
    """s * B @ A of one loaded delta, as the references take it: in float64 for the spectral merges, whose top-k
    cuts and polar factors amplify the rounding of a float32 product (Iso-CTS: 1e-4 relative on the tiny deltas)."""
    dtype = torch.float64 if MERGE_METHODS[method].spectral else layer.lora_A[name].weight.dtype
    return (scaling * (layer.lora_B[name].weight.to(dtype) @ layer.lora_A[name].weight.to(dtype))).detach()


def ref_svd(d, tol=1e-6):
    """Dense SVD without the zero singular values (float64 products of float32 factors: zeros below 1e-6)."""
    U, S, Vh = torch.linalg.svd(d, full_matrices=False)
    keep = S > S.max() * tol
    return U[:, keep], S[keep], Vh[keep]


def ref_tsv(deltas, weights):
    """TSV-M on the full d_out x d_in deltas (Gargiulo et al. 2025, every nonzero singular vector kept)."""
    svds = [(U, S * w, Vh) for d, w in zip(deltas, weights) if w != 0 for U, S, Vh in [ref_svd(d)]]
    U, _, Vh = torch.linalg.svd(torch.cat([u for u, _, _ in svds], 1), full_matrices=False)
    P, _, Qh = torch.linalg.svd(torch.cat([v for _, _, v in svds], 0).T, full_matrices=False)
    return (U @ Vh) @ torch.diag(torch.cat([s for _, s, _ in svds])) @ (P @ Qh).T


def ref_iso_c(deltas, weights):
    """Iso-C on the full deltas (Marczak et al. 2025): the sum's nonzero spectrum replaced by its mean."""
    U, S, Vh = ref_svd(sum(d * w for d, w in zip(deltas, weights)))
    return S.mean() * U @ Vh


def ref_iso_cts(deltas, weights, common_share=0.8):
    """Iso-CTS on the full deltas: the sum's top 80% directions, each delta's top share outside them, whitened."""
    kept = [d * w for d, w in zip(deltas, weights) if w != 0]
    U, S, Vh = ref_svd(sum(kept))
    s = max(1, round((1 - common_share) * S.numel() / len(kept)))
    k = max(1, S.numel() - s * len(kept))
    outside = torch.eye(U.shape[0], dtype=U.dtype) - U[:, :k] @ U[:, :k].T
    parts = [(U[:, :k], S[:k], Vh[:k])] + [(u[:, :s], v[:s], h[:s]) for d in kept for u, v, h in [ref_svd(outside @ d)]]
    left, _, lh = torch.linalg.svd(torch.cat([u for u, _, _ in parts], 1), full_matrices=False)
    right, _, rh = torch.linalg.svd(torch.cat([h for _, _, h in parts], 0).T, full_matrices=False)
    return torch.cat([v for _, v, _ in parts]).mean() * (left @ lh) @ (right @ rh).T


SPECTRAL_REFERENCES = {"tsv": ref_tsv, "iso_c": ref_iso_c, "iso_cts": ref_iso_cts}


def ref_merge(deltas, weights, method, density=1.0, seeds=None):
    sparsify = MERGE_METHODS[method].sparsify
    if sparsify == "magnitude":
        deltas = [ref_magnitude(d, density) for d in deltas]
    elif sparsify == "random":
        deltas = [ref_random(d, density, s) for d, s in zip(deltas, seeds)]
    w = torch.tensor(weights, dtype=deltas[0].dtype)[:, None, None]
    weighted = torch.stack(deltas) * w
    if method == "linear_norm":  # f(sum |w_i| P_i) @ sum w_i dW_i, P_i onto each delta's output directions
        gram = 0
        for d, wi in zip(deltas, weights):
            U, S, _ = torch.linalg.svd(d.double(), full_matrices=False)
            U = U[:, S > S.max() * 1e-6]
            gram = gram + abs(wi) * U @ U.T
        lam, E = torch.linalg.eigh(gram)
        return ((E * (1 / lam.clamp(min=1))) @ E.T @ weighted.sum(0).double()).to(weighted.dtype)
    if method in SPECTRAL_REFERENCES:
        return SPECTRAL_REFERENCES[method]([d.double() for d in deltas], weights).to(deltas[0].dtype)
    if MERGE_METHODS[method].combine in (ties_sum, ties_norm_sum):
        majority = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).to(weighted.dtype)
        mask = weighted.sign() == majority
        weighted = weighted * mask
        if MERGE_METHODS[method].normalize:  # mergekit's normalize, the divisor capped below at 1
            return weighted.sum(0) / (w.abs() * mask).sum(0).clamp(min=1)
    return weighted.sum(0)
