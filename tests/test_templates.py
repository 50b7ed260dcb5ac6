"""The chat template is checked against the model before any training: LLaMA-Factory's multimodal templates
(gemma3, qwen2_vl, ...) stop training on a text-only model with "Processor was not found"."""
import json
import subprocess
import sys

import pytest
import yaml

from autollm_lf.errors import UserError
from autollm_lf.train.render import check_template


@pytest.mark.parametrize("name, folder_files, expected", [
    ("gemma", [], None),
    ("default", [], None),
    ("gemma3", ["preprocessor_config.json"], None),  # a multimodal model: its processor is there
    ("gemma3", [], "'gemma3' is a multimodal template and {dir} has no processor"),
    ("gemma3", [], "use template 'gemma' instead"),
    ("gemmma", [], "LLaMA-Factory has no template 'gemmma'; did you mean gemma"),
])
def test_template_checked_against_the_model(tmp_path, name, folder_files, expected):
    for f in folder_files:
        (tmp_path / f).write_text("{}")
    if expected is None:
        check_template(name, tmp_path)
        return
    with pytest.raises(UserError) as err:
        check_template(name, tmp_path)
    assert expected.format(dir=tmp_path) in str(err.value) and "\n" not in str(err.value)


def test_run_stops_before_training_with_one_line(tiny_model, tmp_path):
    """`autollm run` with template gemma3 on a text-only model: exit 2, one error line, nothing trained."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"p{i}", "response": "r", "task": "ab"[i % 2]}) + "\n"
                            for i in range(40)))
    cfg = {"name": "tpl", "run_dir": str(tmp_path / "runs"),
           "base_model": {"path": str(tiny_model), "template": "gemma3"},
           "data": {"sources": [{"type": "file", "path": str(data)}], "validation_per_chunk": 4, "test_per_chunk": 4}}
    path = tmp_path / "tpl.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = subprocess.run([sys.executable, "-m", "autollm_lf", "run", str(path)], capture_output=True, text=True,
                         check=False, timeout=600)
    assert res.returncode == 2, res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: base_model.template: 'gemma3'"), res.stderr
    assert "use template 'gemma' instead" in errors[0] and "Traceback" not in res.stderr
    assert not (tmp_path / "runs" / "tpl" / "deltas").exists()
