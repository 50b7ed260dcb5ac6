"""search.optimizer: gradient on a tiny model: resumes after a kill to the same trials, seeded, logs the holdout
score, really lowers the teacher-forced loss, and leaves the in-place merge exact (fold mode restored)."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from autollm_lf.config import EvaluationConfig, SearchConfig
from autollm_lf.errors import UserError
from autollm_lf.merge import WeightedDeltas
from autollm_lf.search.loop import run_search


class TinyScorer:
    """Fixed random prompt/answer rows; a row's score is the mean probability of its answer tokens."""

    def __init__(self, model, n=16, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.model = model
        self.encoded = [(torch.randint(5, 90, (6,), generator=g).tolist(),
                         torch.randint(5, 90, (3,), generator=g).tolist())
                        for _ in range(n)]
        self.rows = [{"chunk": "x"}] * n

    def row_scores(self):
        with torch.no_grad():
            ids = torch.tensor([p + t for p, t in self.encoded])
            probs = self.model(input_ids=ids).logits[:, 5:-1].softmax(-1)
            targets = torch.tensor([t for _, t in self.encoded])
            return probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).mean(-1).tolist()

    def score(self):
        return float(np.mean(self.row_scores()))


class TinySession:
    def __init__(self, weighted, merge="linear", logits_budget=0.05, memory="fast", n_iter=40):
        self.weighted, self.cfg = weighted, SimpleNamespace(
            search=SimpleNamespace(merge=merge, memory=memory, select="holdout", bounds=(0.0, 1.0), n_iter=n_iter),
            evaluation=SimpleNamespace(logits_budget=logits_budget, metric="exact_match", objective=[]))
        self._scorer = TinyScorer(weighted.model)

    def validation_rows(self):
        return len(self._scorer.rows)

    def scorer(self, split):
        return self._scorer

    def score(self, weights, split):
        self.weighted.set_weights(weights)
        return self._scorer.score()

    def scored_rows(self, weights, split, method=None):
        self.weighted.set_weights(weights, method)
        scores = self._scorer.row_scores()
        return float(np.mean(scores)), scores


@pytest.fixture(scope="module")
def weighted(tiny_model, tiny_adapters):
    return WeightedDeltas(tiny_model, tiny_adapters, mode="fold", granularity="module_kind")


def cfg(out, seed=3, n_iter=5):
    return SimpleNamespace(out=out, seed=seed, search=SearchConfig(init_points=1, n_iter=n_iter, optimizer="gradient",
                                                                   granularity="module_kind"))


def trials(out):
    return [json.loads(l) for l in (out / "search" / "trials.jsonl").read_text().splitlines()]


def strip(ts):
    return [{k: v for k, v in t.items() if k not in ("eval_seconds", "seconds")} for t in ts]


def test_gradient_resumes_after_kill_and_is_seeded(weighted, tmp_path):
    params = weighted.params
    run_search(cfg(tmp_path / "full"), TinySession(weighted), params, fp="x")
    full = trials(tmp_path / "full")
    grad = [t for t in full if t["kind"] == "gradient"]
    assert len(grad) == 5 and all(0.0 <= t["holdout"] <= 1.0 for t in grad)
    assert len({json.dumps(t["weights"], sort_keys=True) for t in grad}) == 5  # the trajectory moves
    lines = (tmp_path / "full" / "search" / "trials.jsonl").read_text().splitlines()
    cut = len(full) - 3  # killed after two gradient trials, a torn third line
    (tmp_path / "cut" / "search").mkdir(parents=True)
    (tmp_path / "cut" / "search" / "trials.jsonl").write_text("\n".join(lines[:cut]) + "\n" + lines[cut][:30])
    run_search(cfg(tmp_path / "cut"), TinySession(weighted), params, fp="x")
    resumed = trials(tmp_path / "cut")
    assert len(resumed) == len(full)
    for a, b in zip(strip(resumed), strip(full)):
        assert a.keys() == b.keys() and a["kind"] == b["kind"]
        assert a["weights"] == pytest.approx(b["weights"], rel=1e-6, abs=1e-7)
        assert a["validation"] == pytest.approx(b["validation"], rel=1e-6)
    run_search(cfg(tmp_path / "again"), TinySession(weighted), params, fp="x")  # seeded: the same run twice
    assert all(a["weights"] == pytest.approx(b["weights"], rel=1e-6, abs=1e-7)
               for a, b in zip(trials(tmp_path / "again"), full))
    run_search(cfg(tmp_path / "other", seed=4), TinySession(weighted), params, fp="x")
    assert trials(tmp_path / "other")[-1]["weights"] != full[-1]["weights"]


def test_a_finished_search_run_again_fits_nothing(weighted, tmp_path, monkeypatch):
    """The gradient's replay refits its trajectory (minutes on a real model): only a search with work left does it."""
    from autollm_lf.search.optimizers import gradient

    done = run_search(cfg(tmp_path, n_iter=2), TinySession(weighted), weighted.params, fp="x")
    before = (tmp_path / "search" / "trials.jsonl").read_text()
    fits = []
    monkeypatch.setattr(gradient, "fit_steps", lambda *a, **k: fits.append(1))
    again = run_search(cfg(tmp_path, n_iter=2), TinySession(weighted), weighted.params, fp="x")
    assert fits == [] and again == done and (tmp_path / "search" / "trials.jsonl").read_text() == before
    monkeypatch.undo()
    run_search(cfg(tmp_path, n_iter=3), TinySession(weighted), weighted.params, fp="x")  # a larger budget goes on
    longer = (tmp_path / "search" / "trials.jsonl").read_text()
    assert longer.startswith(before) and len(longer.splitlines()) == len(before.splitlines()) + 1
    assert run_search(cfg(tmp_path, n_iter=2), TinySession(weighted), weighted.params, fp="x") == done  # and back


def test_a_kept_optimiser_goes_on_without_refitting_as_a_replay_would(weighted, tmp_path, monkeypatch):
    """The merge race's two rounds in one process: the second takes the first's optimiser back (`kept`) instead of
    replaying its trials, which for the gradient refits them; the trials are those of one straight search."""
    from autollm_lf.search.optimizers import gradient

    run_search(cfg(tmp_path / "straight", n_iter=3), TinySession(weighted), weighted.params, fp="x")
    fit, fits = gradient.fit_steps, []
    monkeypatch.setattr(gradient, "fit_steps", lambda *a, **k: (fits.append(1), fit(*a, **k))[1])
    session, kept = TinySession(weighted), {}
    run_search(cfg(tmp_path / "rounds", n_iter=1), session, weighted.params, fp="x", kept=kept)
    run_search(cfg(tmp_path / "rounds", n_iter=3), session, weighted.params, fp="x", kept=kept)
    assert len(fits) == 3  # one per gradient trial: nothing refitted
    for a, b in zip(trials(tmp_path / "rounds"), trials(tmp_path / "straight"), strict=True):
        assert a["weights"] == pytest.approx(b["weights"], rel=1e-6, abs=1e-7)
    finished = {}  # a finished search skips the replay: its optimiser has seen nothing and is not kept
    run_search(cfg(tmp_path / "rounds", n_iter=2), session, weighted.params, fp="x", kept=finished)
    assert finished == {} and len(fits) == 3


def test_the_budget_is_not_part_of_the_search_fingerprint():
    from autollm_lf.search.loop import search_fingerprint
    fp = lambda **search: search_fingerprint(SimpleNamespace(search=SearchConfig(**search),
                                                             evaluation=EvaluationConfig(), seed=0), ["a"], {}, "v")
    assert fp(n_iter=3) == fp(n_iter=9) == fp(n_iter=3, patience=2)
    assert fp(n_iter=3) != fp(n_iter=3, merge="regmean") and fp(n_iter=3) != fp(n_iter=3, init_points=4)
    # the gradient's step size follows a short budget: another n_iter there is another trajectory
    grad = lambda n_iter: fp(n_iter=n_iter, optimizer="gradient")
    assert grad(8) == grad(40) and grad(3) != grad(9)


def test_a_short_budget_takes_steps_that_can_cross_the_bounds():
    from autollm_lf.search.optimizers.gradient import LEARNING_RATE, STEPS, learning_rate
    assert learning_rate(SearchConfig(n_iter=40)) == LEARNING_RATE  # the toy's budget: its steps as they were
    for n_iter, bounds in ((1, (0.0, 1.0)), (3, (0.0, 1.0)), (3, (0.0, 2.0)), (7, (-1.0, 1.0))):
        search = SearchConfig(n_iter=n_iter, bounds=bounds)
        assert STEPS * n_iter * learning_rate(search) >= 2 * (bounds[1] - bounds[0]) - 1e-9


def test_one_trial_of_a_short_budget_moves_a_weight_further_than_a_long_budgets_can(weighted, tiny_adapters):
    from autollm_lf.search.optimizers import gradient

    def moved(n_iter):
        session = TinySession(weighted, n_iter=n_iter)
        opt = gradient.GradientOptimizer(weighted.params, (0.0, 1.0), 0, session)
        opt.register({p: 1.0 for p in weighted.params}, 0.0, own=False)
        return max(abs(1.0 - w) for w in opt.suggest(0).values())

    assert moved(40) <= gradient.STEPS * gradient.LEARNING_RATE + 1e-6  # Adam's steps are about lr each at most
    assert moved(1) > gradient.STEPS * gradient.LEARNING_RATE + 0.05


@pytest.mark.parametrize("memory", ["fast", "lean"])  # lean: sliced LM head, checkpointed layers, mmap thresholds
def test_gradient_lowers_the_loss_and_keeps_the_merge_exact(weighted, tiny_model, tiny_adapters, memory):
    from autollm_lf.search.optimizers import gradient

    session = TinySession(weighted, memory=memory)
    opt = gradient.GradientOptimizer(weighted.params, (0.0, 1.0), 0, session)
    opt.register({p: 0.5 for p in weighted.params}, 0.0, own=False)
    batch = [session.scorer("validation").encoded[i] for i in opt.fit_rows]

    def loss(point):
        weighted.use_mode("cat")
        weighted.set_weights(point)
        with torch.no_grad():
            value = gradient.answer_nll(weighted, batch)
        weighted.use_mode("fold")
        return value.item() / sum(len(t) for _, t in batch)

    start = {p: 0.5 for p in weighted.params}
    point = start
    for number in range(6):
        point = opt.suggest(number)
    assert loss(point) < loss(start) - 1e-3
    assert weighted.mode == "fold"  # the fit ran in `cat` and put `fold` back
    weighted.set_weights(point)
    reference = WeightedDeltas(tiny_model, tiny_adapters, mode="cat", granularity="module_kind")
    reference.set_weights(point)
    ids = torch.tensor([[5, 17, 33, 40, 71, 2, 9, 60]])
    with torch.no_grad():
        # fold adds the merge into the base weights, cat keeps it beside them: fp32 sums in another order, 8e-5
        # apart on this CPU's kernels (lean); a wrong merge is orders of magnitude further
        torch.testing.assert_close(weighted.model(input_ids=ids).logits, reference.model(input_ids=ids).logits,
                                   atol=2e-4, rtol=1e-4)


def test_the_fit_in_row_slices_gives_the_whole_batch_gradient(weighted, monkeypatch):
    """A logits budget of one row per call (a 262k vocabulary's case) and checkpointed decoder layers backpropagate
    the same mean loss and gradient, and the gradient that reaches the weights through A_cat's is autograd's
    straight through A_cat = unit * s * w[owner] (torch.func.functional_call)."""

    from autollm_lf.search.optimizers import gradient
    monkeypatch.setattr("autollm_lf.evaluate.logits.MIN_LOGITS_BYTES", 0)  # a tiny model's logits: cut them anyway

    session = TinySession(weighted)
    encoded = session.scorer("validation").encoded  # prompts and answers of different lengths: padding, spans
    batch = [(p[: 2 + i % 4], t[: 1 + i % 3]) for i, (p, t) in enumerate(encoded[:6])]
    start = [0.3 + 0.1 * (i % 5) for i in range(len(weighted.params))]
    weighted.use_mode("cat")
    try:
        weighted.set_weights(dict(zip(weighted.params, start)))
        results = []
        for budget, checkpoint in ((1.0, False), (1e-9, False), (1.0, True)):  # whole batch; one row per call
            x = torch.tensor(start, requires_grad=True)
            table = lambda: gradient.full_table(weighted, weighted.params, x)  # noqa: E731
            loss = gradient.backward_mean_nll(weighted, table, batch, budget, checkpoint)
            results.append((loss, x.grad.clone()))
        assert not any(hasattr(m, "__dict__") and "forward" in m.__dict__ for m in weighted.model.modules())
        # the reference: the weights straight into A_cat, one differentiable call
        names = {id(p): n for n, p in weighted.model.named_parameters()}
        x = torch.tensor(start, requires_grad=True)
        flat = gradient.full_table(weighted, weighted.params, x)
        override = {names[id(A)]: unit * (flat.double()[index] * scale).to(unit.dtype).unsqueeze(1)
                    for (A, unit, scale), index in zip([(c.A, c.unit, c.scale) for c in weighted.bank.cat],
                                                         weighted.bank.row_index)}
        with monkeypatch.context() as m:
            m.setattr(weighted.bank, "model", _Called(weighted.model, override))
            (gradient.answer_nll(weighted, batch) / sum(len(t) for _, t in batch)).backward()
        assert all(A.grad is None and not A.requires_grad for A in [m.A for m in weighted.bank.cat])  # left as it was
    finally:
        weighted.use_mode("fold")
    (whole, g_whole), (sliced, g_sliced), (checkpointed, g_checkpointed) = results
    assert g_whole.abs().sum() > 0
    assert sliced == pytest.approx(whole, rel=1e-5) and checkpointed == pytest.approx(whole, rel=1e-6)
    torch.testing.assert_close(g_checkpointed, g_whole, rtol=1e-5, atol=1e-7)  # the layers run again, the same
    # float32 sums in another order: equal to ~1e-4 of the largest entry (seen 2e-4; a lost row would be ~1e-1)
    torch.testing.assert_close(g_sliced, g_whole, rtol=0, atol=1e-3 * g_whole.abs().max().item())
    torch.testing.assert_close(g_whole, x.grad, rtol=0, atol=1e-3 * g_whole.abs().max().item())


class _Called:
    """The model with some parameters replaced for its calls (functional_call), for the reference gradient."""

    def __init__(self, model, override):
        self.model, self.override = model, override

    def __call__(self, **kwargs):
        from torch.func import functional_call
        return functional_call(self.model, self.override, args=(), kwargs=kwargs)

    def parameters(self):
        return self.model.parameters()


@pytest.mark.parametrize("merge", ["ties", "tsv"])
def test_gradient_needs_a_differentiable_merge(weighted, merge):
    with pytest.raises(UserError, match=r"linear, linear_norm, regmean, regmean_core, regmean_w, or pick bayes"):
        from autollm_lf.search.optimizers.gradient import GradientOptimizer
        GradientOptimizer(weighted.params, (0.0, 1.0), 0, TinySession(weighted, merge=merge))


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_sliced_nll_is_the_cross_entropy_and_its_gradient(softcap):
    """The fit's LM head over vocabulary slices, forward and a backward of its own (logits computed again per
    slice, the soft-capping's derivative by hand), against autograd through whole logits (Gemma's final
    soft-capping: cap * tanh(logits / cap))."""
    from autollm_lf.evaluate import ChunkedHead
    from autollm_lf.search.optimizers.gradient import sliced_nll

    torch.manual_seed(0)
    head = ChunkedHead.__new__(ChunkedHead)
    head.linear, head.softcap = torch.nn.Linear(16, 50, bias=False), softcap
    head.linear.weight.requires_grad_(False).mul_(4)  # logits of a few units: the soft-capping bends them
    hidden = torch.randn(7, 16, requires_grad=True)
    labels = torch.tensor([0, 49, 12, 13, 7, 30, 12])  # the first and last ids: slice edges

    logits = head.linear(hidden)
    logits = logits if softcap is None else softcap * torch.tanh(logits / softcap)
    expected = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
    (want,) = torch.autograd.grad(expected, hidden)
    for columns in (50, 8, 1):  # whole; slices not dividing the vocabulary; one id per slice
        h = hidden.detach().requires_grad_(True)
        loss = sliced_nll(h, labels, head, columns)
        loss.backward()
        torch.testing.assert_close(loss, expected.detach())
        torch.testing.assert_close(h.grad, want)
    assert want.abs().sum() > 0


def test_a_session_scores_a_point_once_per_method(weighted):
    """The report and the bad cases reuse the search's scores of a point (same weights, method and rows), and only
    those: another method or other weights are scored afresh, and a remembered point gives its own scores, not the
    scores of the weights set last."""
    from autollm_lf.session import Session

    scorer = TinyScorer(weighted.model)
    calls = []
    counted = lambda: calls.append(1) or TinyScorer.row_scores(scorer)
    scorer.row_scores = counted
    session = Session.__new__(Session)  # a session's scoring alone, on the tiny merge
    session.cfg = SimpleNamespace(search=SimpleNamespace(merge="linear"), evaluation=SimpleNamespace(objective=None))
    session._weighted, session._scorers, session._row_scores = weighted, {"validation": scorer}, {}
    a = {p: 0.5 for p in weighted.params}
    b = {p: 1.0 for p in weighted.params}
    first = session.scored_rows(a, "validation")
    assert session.score(a, "validation") == first[0] and len(calls) == 1
    other = session.scored_rows(b, "validation")
    assert len(calls) == 2 and other[1] != first[1]
    assert session.scored_rows(a, "validation") == first and len(calls) == 2  # b is set now; a's own scores come back
    assert session.scored_rows({d: 0.5 for d in weighted.names}, "validation") == first and len(calls) == 2  # per delta
    ties = session.scored_rows(a, "validation", "ties")
    assert len(calls) == 3 and ties[1] != first[1]
    weighted.use_method("ties")  # what the quality bench does between methods: now a's scores are ties'
    try:
        assert session.scored_rows(a, "validation") == ties and len(calls) == 3
    finally:
        weighted.use_method("linear")
    weighted.set_weights(a)
    assert TinyScorer.row_scores(scorer) == first[1]
