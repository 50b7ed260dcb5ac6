"""Back into LLaMA-Factory: WebUI saves layout (checked in a real WebUI in headless Chromium), export.yaml run by the
real `llamafactory-cli export`, chat.yaml loaded by `llamafactory.chat.ChatModel`, train@auto_mix, report.html."""
import base64
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import autollm, write_config

from autollm_lf.evaluate.intervals import fmt
from autollm_lf.train.auto_mix import mix_probs

pytestmark = pytest.mark.slow  # real llamafactory-cli runs

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    """A real run with `--full`: trains, searches, trains train@auto_mix, reports, exports."""
    tmp = tmp_path_factory.mktemp("eco")
    cfg = write_config(tmp, tiny_model, name="eco")
    # loss, not exact match: a tiny model's exact match ties at 0 and the best merge would be raw (all weights 0)
    cfg.write_text(cfg.read_text().replace("batch_size: 8", "batch_size: 8\n  metric: loss"))
    res = autollm("run", str(cfg), "--full", cwd=tmp)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return tmp, tmp / "runs" / "eco", res


def test_quiet_progress_when_not_a_tty(exported):
    _, _, res = exported
    out = res.stdout + res.stderr
    assert "\r" not in out  # no progress-bar redraws in a log
    for delta in ("math-sft", "code-sft", "all", "auto_mix"):
        assert re.search(rf"training delta {delta}: done in \d+ s", res.stdout), delta


def test_saves_follow_the_webui_layout(exported):
    tmp, run, _ = exported
    lora = tmp / "saves" / "Custom" / "lora"
    assert sorted(p.name for p in lora.iterdir()) == sorted(
        f"eco-{n}" for n in ("best", "math-sft", "code-sft", "all", "auto_mix"))
    best = lora / "eco-best"
    assert ((best / "adapter_model.safetensors").read_bytes()
            == (run / "merged" / "adapter_model.safetensors").read_bytes())
    user = yaml.safe_load((tmp / "llamaboard_cache" / "user_config.yaml").read_text())
    base = yaml.safe_load((run / "config.resolved.yaml").read_text())["base_model"]["path"]
    assert user["path_dict"]["Custom"] == base and user["last_model"] == "Custom"


def test_full_export_ran_export_yaml_and_scores_like_the_adapter(exported):
    _, run, _ = exported
    spec = yaml.safe_load((run / "export.yaml").read_text())
    assert spec["adapter_name_or_path"] == str(run / "merged") and spec["finetuning_type"] == "lora"
    full = Path(spec["export_dir"])
    assert (full / "config.json").is_file() and list(full.glob("*.safetensors"))
    assert (full / "export.log").stat().st_size > 0
    info = json.loads((full / "autollm_full.json").read_text())
    adapter = json.loads((run / "merged" / "autollm_export.json").read_text())["exported_validation"]
    assert info["adapter_validation"] == adapter
    assert abs(info["full_validation"] - adapter) < 1e-6
    # Scores of a tiny model can tie at 0; the logits say whether the full weights really hold the merge.
    import torch
    from peft import PeftModel

    from autollm_lf.merge import load_base
    base, tok = load_base(spec["model_name_or_path"])
    with_adapter = PeftModel.from_pretrained(base, spec["adapter_name_or_path"]).eval()
    merged, _ = load_base(full)
    ids = torch.tensor([tok.encode("abc+def=") + tok.encode("hgfe")])
    with torch.no_grad():
        want, got = with_adapter(ids).logits, merged.eval()(ids).logits
        assert torch.allclose(got, want, atol=1e-4)
        with with_adapter.disable_adapter():
            assert not torch.allclose(with_adapter(ids).logits, want, atol=1e-3)  # the merge changed the model


def test_chat_yaml_loads_in_chatmodel_and_answers_like_our_greedy_decoding(exported):
    from llamafactory.chat import ChatModel
    from peft import PeftModel

    from autollm_lf.checks import load_config
    from autollm_lf.data.prepare import load_split
    from autollm_lf.evaluate.metrics import make_evaluator
    from autollm_lf.merge import load_base

    _, run, _ = exported
    args = yaml.safe_load((run / "chat.yaml").read_text())
    assert args["adapter_name_or_path"] == str(run / "merged")
    chat = ChatModel({**args, "do_sample": False, "max_new_tokens": 24})
    cfg = load_config(run / "config.resolved.yaml")
    cfg.evaluation.max_new_tokens, cfg.evaluation.metric = 24, "contains"
    rows = load_split(cfg, "validation")[:4]
    base, tokenizer = load_base(cfg.base_model.path)
    model = PeftModel.from_pretrained(base, str(run / "merged")).eval()
    expected = make_evaluator(cfg, model, tokenizer, rows).predictions()  # batched greedy generate, as the search does
    got = [chat.chat([{"role": "user", "content": r["prompt"]}])[0].response_text.strip() for r in rows]
    assert got == expected


def test_auto_mix_interleaves_by_the_best_weights(exported):
    _, run, _ = exported
    mixed = yaml.safe_load((run / "configs" / "auto_mix.yaml").read_text())
    best = json.loads((run / "search" / "best.json").read_text())["weights"]
    assert mixed["mix_strategy"] == "interleave_under" and mixed["dataset"] == "code,math"
    want = mix_probs({"code": best["code-sft"], "math": best["math-sft"]}, floor=0.05)
    assert [float(p) for p in str(mixed["interleave_probs"]).split(",")] == pytest.approx(list(want.values()), abs=1e-4)
    report = json.loads((run / "report" / "report.json").read_text())
    assert [r["model"] for r in report["rows"]][-2:] == ["auto_merge", "train@auto_mix"]


def test_report_html_is_self_contained(exported):
    _, run, _ = exported
    html = (run / "report" / "report.html").read_text()
    assert not re.search(r'(src|href)="(?!data:)', html)  # nothing fetched from elsewhere
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(images) == 2 and all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    report = json.loads((run / "report" / "report.json").read_text())
    for r in report["rows"]:  # the same score and interval as report.md shows
        validation, test = fmt(r["validation"], r.get("validation_ci")), fmt(r["test"], r.get("test_ci"))
        assert f"<td>{r['model']}</td><td>{validation}</td><td>{test}</td>" in html


def test_mix_probs_properties():
    p = mix_probs({"a": 0.6, "b": 0.2, "c": 0.0}, floor=0.05)
    assert sum(p.values()) == pytest.approx(1.0)
    assert p["c"] == pytest.approx(0.05 / 1.05) and p["a"] / p["b"] == pytest.approx(3.0)
    assert mix_probs({"a": 0.0, "b": -1.0}, floor=0.0) == {"a": 0.5, "b": 0.5}  # nothing preferred: uniform
    assert mix_probs({"a": 1.0, "b": -0.5}, floor=0.0) == {"a": 1.0, "b": 0.0}  # negative weight: never sampled


# ---- the real WebUI in headless Chromium ------------------------------------------------------------------

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _browser(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    assert shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER), \
        "install Debian's chromium and chromium-driver (sh autollm.sh test does it when run as root)"
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", "--window-size=1400,1000"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def _wait_for(predicate, timeout: float, what: str):
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except (StaleElementReferenceException, NoSuchElementException):
            value = None  # Gradio re-rendered the element between finding and reading it: look again
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_webui_lists_the_exported_adapters_and_loads_the_best(exported, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    tmp, _, _ = exported
    port = _free_port()
    env = dict(os.environ, GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port),
               GRADIO_ANALYTICS_ENABLED="False", DISABLE_VERSION_CHECK="1", HF_HUB_OFFLINE="1")
    cli = Path(sys.executable).with_name("llamafactory-cli")
    log = open(tmp_path / "webui.log", "w")
    server = subprocess.Popen([str(cli), "webui"], cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT)
    ARTIFACTS.mkdir(exist_ok=True)
    driver = None
    try:
        _wait_for(lambda: _http_ok(f"http://127.0.0.1:{port}/"), 180, "the WebUI to serve")
        driver = _browser(tmp_path / "profile")
        driver.get(f"http://127.0.0.1:{port}/")
        model = _wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "input[aria-label='Model name']"), 60,
                          "the model name field")[0]
        model.click()
        model.send_keys(Keys.CONTROL, "a")
        model.send_keys("Custom", Keys.ENTER)
        _wait_for(lambda: model.get_attribute("value") == "Custom", 20, "model Custom selected")
        checkpoint = driver.find_element(By.XPATH, "//label[contains(., 'Checkpoint path')]//input")
        checkpoint.click()
        want = {f"eco-{n}" for n in ("best", "math-sft", "code-sft", "all", "auto_mix")}
        options = lambda: {o.text.strip(): o for o in driver.find_elements(By.CSS_SELECTOR, "ul.options li")}
        listed = _wait_for(lambda: (found := set(options())) >= want and found, 30,
                           f"checkpoints {sorted(want)} in the list")
        driver.save_screenshot(str(ARTIFACTS / "webui_checkpoints.png"))
        assert want <= listed
        _wait_for(lambda: (o := options().get("eco-best")) is not None and (o.click() or True), 20,
                  "a click on eco-best")
        checkpoint.send_keys(Keys.ESCAPE)
        click = lambda xpath: driver.execute_script("arguments[0].click()", driver.find_element(By.XPATH, xpath))
        click("//button[@role='tab' and normalize-space()='Chat']")
        click("//button[normalize-space()='Load model']")
        loaded = lambda: any("Model loaded" in (t.get_attribute("value") or "")
                             for t in driver.find_elements(By.TAG_NAME, "textarea"))
        _wait_for(loaded, 120, "the chat tab to load eco-best")
        driver.save_screenshot(str(ARTIFACTS / "webui_chat_loaded.png"))
        assert "saves/Custom/lora/eco-best" in (tmp_path / "webui.log").read_text()
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        server.wait(timeout=30)
        log.close()
