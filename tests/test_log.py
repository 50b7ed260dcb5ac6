"""Logging: -q shows only warnings and errors, -v debug lines too; each run's log in runs/<name>/autollm.log."""
import logging

import pytest
import yaml
from conftest import write_config

from autollm_lf.cli import main
from autollm_lf.log import CONSOLE, get_logger, run_log, set_verbosity

logger = get_logger("autollm_lf.test")


@pytest.fixture(autouse=True)
def default_verbosity():
    yield
    set_verbosity(0)


@pytest.mark.parametrize("verbosity,shown", [(-1, {"warning"}), (0, {"info", "warning"}),
                                             (1, {"debug", "info", "warning"})])
def test_verbosity_picks_what_the_console_shows(capsys, verbosity, shown):
    set_verbosity(verbosity)
    logger.debug("debug")
    logger.info("info")
    logger.warning("warning")
    out, err = capsys.readouterr()
    assert set(out.split()) == shown - {"warning"}  # info and debug on stdout
    assert set(err.split()) == shown & {"warning"}  # warnings and errors on stderr


def test_run_log_waits_for_the_run_folder(tmp_path, capsys):
    """A command that stops before any stage made the run folder leaves none behind; once there, the log holds
    every line since the start, debug included, with its time and module."""
    run = tmp_path / "runs" / "x"
    with run_log(run / "autollm.log"):
        logger.info("checking")
        assert not run.exists()
    assert not run.exists()
    with run_log(run / "autollm.log"):
        logger.info("checking")
        run.mkdir(parents=True)
        logger.debug("a detail")
    lines = (run / "autollm.log").read_text().splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == ["checking", "a detail"]
    assert all(" autollm_lf.test: " in line for line in lines) and CONSOLE.level == logging.INFO


def test_quiet_run_prints_nothing_and_logs_everything(tmp_path, tiny_model, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, tiny_model, name="logged")
    assert main(["-q", "prepare", str(config)]) == 0
    out, err = capsys.readouterr()
    assert out == "" and err == ""
    log = (tmp_path / "runs" / "logged" / "autollm.log").read_text()
    assert "autollm_lf.pipeline: == prepare" in log and "autollm_lf.data.prepare: chunk" in log
    assert main(["prepare", str(config), "-v"]) == 0  # after the command too
    assert "== prepare" in capsys.readouterr().out
    assert (tmp_path / "runs" / "logged" / "autollm.log").read_text().count("== prepare") == 2  # appended


def test_a_failing_stage_is_in_the_log_once_the_run_exists(tmp_path, tiny_model, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, tiny_model, name="fails")
    assert main(["prepare", str(config)]) == 0
    raw = yaml.safe_load(config.read_text())
    raw["search"]["human_weights"] = {"nope": 1.0}  # a chunk that does not exist: found when searching
    config.write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    assert main(["search", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: search.human_weights: unknown chunk 'nope'")
    last = (tmp_path / "runs" / "fails" / "autollm.log").read_text().splitlines()[-1]
    assert last.endswith(err.strip()) and " ERROR autollm_lf.cli: " in last


def test_progress_bars_are_never_drawn_under_quiet():
    from autollm_lf.log import progress

    set_verbosity(-1)
    with progress(total=3, desc="x") as bar:
        assert bar.disable
    set_verbosity(0)
    with progress(total=3, desc="x", disable=False) as bar:  # the caller's choice holds when not quiet
        assert not bar.disable
