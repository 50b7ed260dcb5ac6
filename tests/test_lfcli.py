"""lfcli.apply_overrides: top-level keys found by PyYAML (not by a line pattern), comments and order kept."""
import yaml

from autollm_lf.train.lfcli import apply_overrides, top_level_lines

TEXT = ("# header\nlearning_rate: 1.0e-4  # per step\nlora_target:\n  - q_proj\n  - v_proj\n\n### dataset\n"
        "dataset: a\nnested:\n  key: 1\n")


def test_a_value_over_several_lines_is_replaced_whole():
    assert top_level_lines(TEXT) == {"learning_rate": (1, 1), "lora_target": (2, 4), "dataset": (7, 7),
                                     "nested": (8, 9)}
    out = apply_overrides(TEXT, {"lora_target": "all", "nested": {"key": 2}, "seed": 3})
    assert out.startswith("# header\nlearning_rate: 1.0e-4  # per step\nlora_target: \"all\"\n\n### dataset\n")
    assert yaml.safe_load(out) == {"learning_rate": 1e-4, "lora_target": "all", "dataset": "a", "nested": {"key": 2},
                                   "seed": 3}
    assert list(yaml.safe_load(out)) == ["learning_rate", "lora_target", "dataset", "nested", "seed"]
