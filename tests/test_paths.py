"""paths.RunDir names every run and adapter folder: rounds, labels, deltas, WebUI folders."""
from pathlib import Path

from autollm_lf.config import RunConfig
from autollm_lf.paths import ALL_DELTA, MIX_DELTA, RunDir, delta_name, webui_name


def test_every_run_name_comes_from_rundir():
    runs = Path("/r")
    assert RunDir.of(runs, "toy").root == runs / "toy"
    assert RunDir.of(runs, "toy", 3).root == runs / "toy" / "round-3"
    assert (RunDir.label("toy"), RunDir.label("toy", 2)) == ("toy", "toy-round2")
    assert delta_name("math", "sft") == "math-sft" and (ALL_DELTA, MIX_DELTA) == ("all", "auto_mix")
    assert webui_name("toy-round2", "best") == "toy-round2-best"
    cfg = RunConfig.model_validate({"name": "toy", "run_dir": "/r", "round": 2, "base_model": {"path": "m"},
                                    "data": {"sources": [{"type": "file", "path": "d.jsonl"}]}})
    assert cfg.out == runs / "toy" / "round-2" and cfg.run == RunDir.of(runs, "toy", 2)
    assert cfg.round_run(1).merged_full == runs / "toy" / "merged_full" and cfg.run_label == "toy-round2"
