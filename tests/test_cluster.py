"""`cluster:`: deltas as Ray tasks on a real two-node Ray cluster on localhost, a node lost mid-training, the
search on two Ray actors; and the batched search loop itself (constant liar, order, resume) without Ray."""
import json
import os
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import yaml
from conftest import write_config
from test_search import DELTAS, FakeSession

from autollm_lf.checks import load_config
from autollm_lf.config import SearchConfig
from autollm_lf.errors import UserError
from autollm_lf.search.loop import run_search
from autollm_lf.train.cluster import bring_back, pack, unpack

# ---- config and file shipping ------------------------------------------------------------------------------

def cluster_config(tmp_path, tiny_model, cluster: dict, name="cl"):
    path = write_config(tmp_path, tiny_model, name=name, baselines=False)  # two deltas: one per node
    raw = yaml.safe_load(path.read_text())
    raw["cluster"] = cluster
    path.write_text(yaml.safe_dump(raw))
    return path


def test_cluster_keys_are_checked(tmp_path, tiny_model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as e:
        load_config(cluster_config(tmp_path, tiny_model, {"address": "not an address", "cpus_per_delta": 0}))
    assert "cluster.address: 'not an address' is not a Ray address; write local, auto" in str(e.value)
    assert "cluster.cpus_per_delta: Input should be greater than or equal to 1" in str(e.value)
    with pytest.raises(UserError, match="search_actors > 1 through Ray Client needs cluster.storage"):
        load_config(cluster_config(tmp_path, tiny_model, {"address": "ray://head:10001", "search_actors": 2}))
    with pytest.raises(UserError, match="cluster.storage: .*shared is not a folder here"):  # checked at validate
        load_config(cluster_config(tmp_path, tiny_model, {"address": "ray://head:10001", "search_actors": 2,
                                                          "storage": "shared"}))
    (tmp_path / "shared").mkdir()
    cfg = load_config(cluster_config(tmp_path, tiny_model, {"address": "ray://head:10001", "search_actors": 2,
                                                            "storage": "shared"}))
    assert cfg.cluster.storage == (tmp_path / "shared").resolve()  # relative to the working directory


def test_pack_unpack_round_trip_skips_checkpoints_and_stays_inside(tmp_path):
    src = tmp_path / "out"
    (src / "checkpoint-5").mkdir(parents=True)
    (src / "checkpoint-5" / "big.bin").write_bytes(b"x")
    (src / "sub").mkdir()
    (src / "adapter_model.safetensors").write_bytes(b"\x00\x01")
    (src / "sub" / "train.log").write_text("log")
    files = pack(src, ("checkpoint-",))
    assert sorted(files) == ["adapter_model.safetensors", "sub/train.log"]
    unpack(files, tmp_path / "copy")
    assert (tmp_path / "copy" / "sub" / "train.log").read_text() == "log"
    with pytest.raises(UserError, match="outside"):
        unpack({"../escaped": b"x"}, tmp_path / "copy")
    assert not (tmp_path / "escaped").exists()


def test_bring_back_replaces_the_folder_and_names_the_drivers_base(tmp_path):
    out = tmp_path / "deltas" / "math-sft"
    out.mkdir(parents=True)
    (out / "stale.txt").write_text("old")
    job = SimpleNamespace(out=out, text="model_name_or_path: /driver/base\noutput_dir: x\n")
    config = {"base_model_name_or_path": "/tmp/autollm-math-sft-xyz/model", "r": 8}
    bring_back(job, {"adapter_config.json": json.dumps(config).encode(), "adapter_model.safetensors": b"w"})
    assert not (out / "stale.txt").exists() and (out / "adapter_model.safetensors").read_bytes() == b"w"
    assert json.loads((out / "adapter_config.json").read_text()) == {"base_model_name_or_path": "/driver/base", "r": 8}


# ---- the batched search loop (no Ray: a pool that scores in this process) ---------------------------------

class FakePool:
    """K trials at once, scored here; counts batches, and can fail in a chosen batch (a lost actor)."""

    def __init__(self, size, fail_in_batch=None):
        self.size, self.batches, self.fail_in_batch, self.session = size, [], fail_in_batch, FakeSession()

    def map(self, points):
        if len(self.batches) == self.fail_in_batch:
            raise UserError("search: a Ray actor was lost")
        self.batches.append(len(points))
        return [(dict.fromkeys(("validation", "fit", "holdout"), self.session.score(w, "validation")), 0.01)
                for w in points]


def search_cfg(tmp_path, optimizer="bayes", n_iter=12):
    return SimpleNamespace(out=tmp_path, seed=3, search=SearchConfig(
        bounds=(0.0, 1.0), init_points=3, n_iter=n_iter, optimizer=optimizer))


def logged(d):
    return [{k: v for k, v in json.loads(l).items() if k not in ("eval_seconds", "seconds")}
            for l in (d / "search" / "trials.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("optimizer", ["bayes", "cmaes"])
def test_parallel_search_batches_are_ordered_reproducible_and_resume(tmp_path, optimizer):
    pool = FakePool(3)
    run_search(search_cfg(tmp_path / "a", optimizer), FakeSession(), DELTAS, fp="x", pool=pool)
    trials = logged(tmp_path / "a")
    assert [t["trial"] for t in trials] == list(range(2 + 3 + 3 + 12))
    assert max(pool.batches) == 3 and sum(pool.batches) == len(trials)
    kinds = [t["kind"] for t in trials]
    first_opt = kinds.index(optimizer)
    assert len({json.dumps(t["weights"], sort_keys=True) for t in trials}) == len(trials)  # no point twice
    # a batch never mixes seeds and optimiser points: the optimiser starts from every seed's score
    assert first_opt == 8 and all(k == optimizer for k in kinds[first_opt:])
    best = json.loads((tmp_path / "a" / "search" / "best.json").read_text())
    assert best["validation"] > max(t["validation"] for t in trials[:first_opt])

    run_search(search_cfg(tmp_path / "b", optimizer), FakeSession(), DELTAS, fp="x", pool=FakePool(3))
    assert logged(tmp_path / "b") == trials  # the same trials from the same seed

    with pytest.raises(UserError):  # killed in its 5th batch: 4 whole batches logged, nothing of the 5th
        run_search(search_cfg(tmp_path / "c", optimizer), FakeSession(), DELTAS, fp="x",
                   pool=FakePool(3, fail_in_batch=4))
    cut = logged(tmp_path / "c")
    assert cut == trials[:len(cut)] and len(cut) < len(trials)
    resumed = FakePool(3)
    run_search(search_cfg(tmp_path / "c", optimizer), FakeSession(), DELTAS, fp="x", pool=resumed)
    assert logged(tmp_path / "c") == trials and sum(resumed.batches) == len(trials) - len(cut)


def test_constant_liar_spreads_a_bayes_batch(tmp_path):
    """Without the lie the GP would propose the same point K times (then replaced by random points)."""
    run_search(search_cfg(tmp_path, "bayes", n_iter=9), FakeSession(), DELTAS, fp="x", pool=FakePool(3))
    trials = logged(tmp_path)
    assert not any("replaces" in t for t in trials)
    bayes = [t for t in trials if t["kind"] == "bayes"]
    for i in range(0, len(bayes), 3):
        batch = [tuple(t["weights"].values()) for t in bayes[i:i + 3]]
        assert min(sum((a - b) ** 2 for a, b in zip(p, q)) for p in batch for q in batch if p is not q) > 1e-6


# ---- a real two-node Ray cluster on localhost -------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A head and a worker node of 1 CPU each. The worker's tasks make their temporary folders under its own
    TMPDIR, so the test can see when a training runs there."""
    import ray
    from ray.cluster_utils import Cluster

    worker_tmp = tmp_path_factory.mktemp("worker-tmp")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    worker = cluster.add_node(num_cpus=1, env_vars={"TMPDIR": str(worker_tmp)})
    cluster.wait_for_nodes()
    yield SimpleNamespace(cluster=cluster, worker=worker, worker_tmp=worker_tmp)
    ray.shutdown()
    cluster.shutdown()


def adapters(run, names):
    return {n: (run / "deltas" / n / "adapter_model.safetensors").read_bytes() for n in names}


def kill_worker_once_it_trains(ray_cluster, killed):
    deadline = time.time() + 300
    while time.time() < deadline and not any(p.name.startswith("autollm-") for p in ray_cluster.worker_tmp.iterdir()):
        time.sleep(0.2)
    time.sleep(2)  # inside llamafactory-cli train by now
    ray_cluster.cluster.remove_node(ray_cluster.worker, allow_graceful=False)
    killed.set()


@pytest.mark.slow
def test_deltas_and_search_on_a_two_node_ray_cluster(ray_cluster, tiny_model, tmp_path, tmp_path_factory, monkeypatch,
                                                     capsys):
    from autollm_lf.pipeline import run_stages
    from autollm_lf.session import Session

    deltas = ["math-sft", "code-sft"]
    # the reference: the same run trained here, one thread as a Ray task of 1 CPU has
    local_dir = tmp_path / "local"
    local_dir.mkdir()
    local_cfg = write_config(local_dir, tiny_model, name="cl", baselines=False)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for stage in ("prepare", "train"):
        res = subprocess.run([sys.executable, "-m", "autollm_lf", stage, str(local_cfg)], cwd=local_dir, env=env,
                             capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, res.stderr[-3000:]
    local = adapters(local_dir / "runs" / "cl", deltas)

    # 1. every delta a Ray task: both nodes train, the adapters equal the local ones bit for bit
    ray_dir = tmp_path / "ray"
    ray_dir.mkdir()
    monkeypatch.chdir(ray_dir)
    address = ray_cluster.cluster.address
    cfg = load_config(cluster_config(ray_dir, tiny_model, {"address": address, "max_retries": 2}))
    run_stages(cfg, ["prepare", "train"])
    run = ray_dir / "runs" / "cl"
    markers = {n: json.loads((run / "deltas" / n / "autollm_delta.json").read_text()) for n in deltas}
    assert len({m["node_id"] for m in markers.values()}) == 2  # both nodes trained
    assert adapters(run, deltas) == local
    for n in deltas:  # the adapter names the driver's base, not the node's shipped copy
        assert json.loads((run / "deltas" / n / "adapter_config.json").read_text())[
            "base_model_name_or_path"] == str(tiny_model)
        assert (run / "deltas" / n / "train.log").is_file()  # the log came back too
    out = capsys.readouterr().out
    assert "train: 2 deltas as Ray tasks on 2 node(s)" in out

    # 2. the worker node dies during training: its task runs again on the head, nothing is lost
    killed = threading.Event()
    killer = threading.Thread(target=kill_worker_once_it_trains, args=(ray_cluster, killed))
    killer.start()
    run_stages(cfg, ["train"], force=frozenset({"train"}))
    killer.join()
    assert killed.is_set()
    assert adapters(run, deltas) == local
    head = ray_cluster.cluster.head_node.node_id
    assert {json.loads((run / "deltas" / n / "autollm_delta.json").read_text())["node_id"] for n in deltas} == {head}

    # 3. the search on 2 Ray actors, one per node (the run dir on storage both nodes see)
    ray_cluster.cluster.add_node(num_cpus=1)
    ray_cluster.cluster.wait_for_nodes()
    storage = str(tmp_path_factory.getbasetemp())  # holds the base model and the run dir
    cfg = load_config(cluster_config(ray_dir, tiny_model, {"address": address, "search_actors": 2,
                                                           "storage": storage}))
    run_stages(cfg, ["search"])
    out = capsys.readouterr().out
    assert "search: 2 trials at once on Ray actors (2 nodes)" in out
    trials = [json.loads(l) for l in (run / "search" / "trials.jsonl").read_text().splitlines()]
    assert [t["trial"] for t in trials] == list(range(2 + 2 + 1 + 2 + 3))  # raw, uniform, 2 alone, human, ...
    session = Session(load_config(cluster_config(ray_dir, tiny_model, {"address": address})))
    for t in trials[:6]:  # an actor scores a point exactly as this process does
        assert session.score(t["weights"], "validation") == pytest.approx(t["validation"], abs=1e-9)
    run_stages(cfg, ["search"], force=frozenset({"search"}))  # from the seed: the same trials again
    again = [json.loads(l) for l in (run / "search" / "trials.jsonl").read_text().splitlines()]
    strip = lambda ts: [(t["trial"], t["kind"], t["weights"], t["validation"]) for t in ts]
    assert strip(again) == strip(trials)
