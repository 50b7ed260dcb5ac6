"""RegMean in the search: the gradient optimiser on `search.merge: regmean` with one weight per delta per module (the
Gemma examples' setting) on the tiny model, and the Grams taken from the chunks' training rows only."""
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from test_search_gradient import TinySession

from autollm_lf.config import RunConfig, SearchConfig
from autollm_lf.data.prepare import prepare
from autollm_lf.merge import WeightedDeltas
from autollm_lf.merge.grams import ensure_grams
from autollm_lf.merge.regmean import GramCollector, GramFiles, padded_batches, save_grams
from autollm_lf.search.loop import run_search
from autollm_lf.search.optimizers import gradient

CHUNK_OF = {"a": "ca", "b": "cb", "c": "cc"}


def regmean_weighted(tiny_model, tiny_adapters, root, granularity="module"):
    """The tiny model with the three adapters under regmean, each delta's Grams from a token set of its own."""
    w = WeightedDeltas(tiny_model, tiny_adapters, mode="cat", method="regmean", granularity=granularity)
    names = [w.layer_names[k] for k in w.bank.cat_index]
    paths = {}
    w.set_weights({d: 0.0 for d in w.names}, method="linear")
    for i, chunk in enumerate(CHUNK_OF.values()):
        paths[chunk] = root / f"{chunk}.safetensors"
        if not paths[chunk].exists():
            collector = GramCollector({n: w.bank.layers[k] for n, k in zip(names, w.bank.cat_index)})
            seqs = [[(7 * i + 3 * j + t) % 90 + 3 for t in range(6 + j % 4)] for j in range(12)]
            collector.run(w.model, padded_batches(seqs, 0, 4))
            save_grams(paths[chunk], collector, "fp", len(seqs))
    files = GramFiles(paths)
    try:
        w.use_regmean(files, CHUNK_OF, 0.5)
    finally:
        files.close()
    w.use_method("regmean")
    return w


@pytest.fixture(scope="module")
def grams_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("grams")


@pytest.fixture(scope="module")
def regmean_module(tiny_model, tiny_adapters, grams_dir):
    return regmean_weighted(tiny_model, tiny_adapters, grams_dir)


def fit_nll(w, batch, point):
    """The fit's loss, the mean cross-entropy of the batch's answer tokens, with the merge at `point`."""
    w.set_weights(dict(zip(w.params, point)))
    with torch.no_grad():
        return gradient.answer_nll(w, batch).item() / sum(len(t) for _, t in batch)


def test_the_fit_follows_the_gradient_of_regmeans_loss(regmean_module):
    """The gradient the fit steps along is the derivative of the loss of the RegMean merge (central differences),
    not of the plain sum of the deltas: it reaches the weights through RegMean's A rows."""
    w = regmean_module
    batch = TinySession(w, merge="regmean").scorer("validation").encoded[:8]
    start = [0.3 + 0.1 * (i % 5) for i in range(len(w.params))]
    x = torch.tensor(start, requires_grad=True)
    w.set_weights(dict(zip(w.params, start)))
    loss = gradient.backward_mean_nll(w, lambda: gradient.full_table(w, w.params, x), batch, 1.0,
                                      checkpoint=False, sliced=False)
    assert loss == pytest.approx(fit_nll(w, batch, start), rel=1e-5)
    # a small step: the tiny deltas (B x 20) bend the loss sharply; the float32 loss then moves in steps of ~1.6e-3
    # of the quotient, which the absolute tolerance covers (the plain sum's gradient is off by up to 0.6 here)
    h, checked = 1e-4, 0
    for i in range(len(w.params)):
        up, down = list(start), list(start)
        up[i] += h
        down[i] -= h
        numeric = (fit_nll(w, batch, up) - fit_nll(w, batch, down)) / (2 * h)
        assert float(x.grad[i]) == pytest.approx(numeric, rel=0.05, abs=6e-3), w.params[i]
        checked += abs(numeric) > 0.05
    assert checked >= 3  # weights that matter, not zeros agreeing with zeros


def test_gradient_search_on_regmean_moves_the_weights_and_lowers_the_fit_loss(regmean_module, tiny_model,
                                                                              tiny_adapters, grams_dir, tmp_path):
    w = regmean_module
    session = TinySession(w, merge="regmean")
    opt = gradient.GradientOptimizer(w.params, (0.0, 1.0), 0, session)
    start = [0.5] * len(w.params)
    opt.register(dict(zip(w.params, start)), 0.0, own=False)
    batch = [session.scorer("validation").encoded[i] for i in opt.fit_rows]
    point = None
    for number in range(6):
        point = opt.suggest(number)
    assert w.method == "regmean" and w.mode == "cat"
    moved = [p for p in w.params if abs(point[p] - 0.5) > 1e-3]
    assert len(moved) >= len(w.params) // 2
    assert fit_nll(w, batch, [point[p] for p in w.params]) < fit_nll(w, batch, start) - 1e-3
    # the merge the fit leaves in place is RegMean's at the fitted point (a fresh regmean model set to it)
    w.set_weights(point)
    reference = regmean_weighted(tiny_model, tiny_adapters, grams_dir)
    reference.set_weights(point)
    ids = torch.tensor([[5, 17, 33, 40, 71, 2, 9, 60]])
    with torch.no_grad():
        torch.testing.assert_close(w.model(input_ids=ids).logits, reference.model(input_ids=ids).logits,
                                   atol=5e-5, rtol=0)
    # and through the search loop: seeds, then a trajectory of distinct points, each with its holdout score
    cfg = SimpleNamespace(out=tmp_path, seed=3, search=SearchConfig(init_points=1, n_iter=3, optimizer="gradient",
                                                                    merge="regmean", granularity="module"))
    run_search(cfg, TinySession(w, merge="regmean"), w.params, fp="x")
    trials = [json.loads(l) for l in (tmp_path / "search" / "trials.jsonl").read_text().splitlines()]
    steps = [t for t in trials if t["kind"] == "gradient"]
    assert len(steps) == 3 and all(0.0 <= t["holdout"] <= 1.0 for t in steps)
    assert len({json.dumps(t["weights"], sort_keys=True) for t in steps}) == 3


# ---- the Grams' data ---------------------------------------------------------------------------------------

def grams_cfg(root, tiny_model) -> RunConfig:
    rows = [{"task": task, "prompt": f"{task} question {i}: {'xyz' * (i % 4)}", "response": f"answer {i} {task}"}
            for task in ("ca", "cb") for i in range(20)]
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return RunConfig.model_validate({
        "name": "g", "run_dir": str(root / "runs"), "base_model": {"path": str(tiny_model), "template": "default"},
        "data": {"sources": [{"type": "file", "path": str(root / "rows.jsonl")}], "chunk_by": "task",
                 "validation_per_chunk": 4, "test_per_chunk": 4}})


def test_grams_come_from_training_rows_only(tiny_model, tiny_adapters, tmp_path):
    """Every held-out row rewritten: each chunk's Grams, computed afresh, are the same to the bit (and the cached ones
    are kept); one training row of chunk ca rewritten: ca's Grams are computed again and differ, cb's are kept."""
    cfg = grams_cfg(tmp_path, tiny_model)
    prepare(cfg)
    w = WeightedDeltas(tiny_model, tiny_adapters, mode="cat", method="linear")
    chunks = ["ca", "cb"]
    paths = ensure_grams(cfg, w, chunks)
    first = {c: load_file(str(paths[c])) for c in chunks}
    assert all(len(g) > 0 for g in first.values())

    for split in ("validation", "test"):
        path = cfg.run.split(split)
        held = json.loads(path.read_text())
        assert {r["chunk"] for r in held} == set(chunks)
        path.write_text(json.dumps([{**r, "instruction": r["instruction"] + " and more words", "output": "other"}
                                    for r in held]))
    stamps = {c: paths[c].stat().st_mtime_ns for c in chunks}
    assert ensure_grams(cfg, w, chunks) == paths and {c: paths[c].stat().st_mtime_ns for c in chunks} == stamps
    for c in chunks:
        paths[c].unlink()
    ensure_grams(cfg, w, chunks)
    for c in chunks:
        again = load_file(str(paths[c]))
        assert again.keys() == first[c].keys() and all(torch.equal(again[k], first[c][k]) for k in again), c

    train = json.loads(cfg.run.split("ca").read_text())
    train[0] = {**train[0], "instruction": "a question of another kind altogether", "output": "its answer"}
    cfg.run.split("ca").write_text(json.dumps(train))
    stamp_cb = paths["cb"].stat().st_mtime_ns
    ensure_grams(cfg, w, chunks)
    changed = load_file(str(paths["ca"]))
    assert any(not torch.allclose(changed[k], first["ca"][k], rtol=1e-4, atol=1e-4) for k in changed)
    assert paths["cb"].stat().st_mtime_ns == stamp_cb
    assert all(torch.equal(t, first["cb"][k]) for k, t in load_file(str(paths["cb"])).items())
