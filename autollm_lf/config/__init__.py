"""The run config: one YAML file, validated with pydantic. Every error is reported at once, with its key path.

`config` knows no stage: it checks shapes, ranges and the files a config names; the names only a stage defines
(metrics, merge methods, optimisers, training methods, LoRA inits) and what needs a stage's code are checked by
checks.load_config, the entry point every command uses.

Parts: data_section.py (the `data:` section and every source type), sections.py (the other sections), owned.py
(the LLaMA-Factory keys autollm decides itself), run.py (RunConfig), load.py (reading a file, path checks, writing
the resolved config).
"""
from .data_section import (
           PACKAGE_ROOT,
           BadCasesSource,
           DataConfig,
           FileSource,
           GenerateSource,
           LlamaFactorySource,
           SqlSource,
)
from .load import dump_config, override_keys, parse_config, path_problems, source_urls, without_secrets
from .run import RunConfig
from .sections import (
           ONE_BASE,
           ClusterConfig,
           EvaluationConfig,
           ExportConfig,
           JudgeConfig,
           LmEvalConfig,
           ModelConfig,
           ObjectivePart,
           ReportConfig,
           RoundsConfig,
           SearchConfig,
           SharedConfig,
           ToyConfig,
           TrainConfig,
)

__all__ = ["ONE_BASE", "PACKAGE_ROOT", "BadCasesSource", "ClusterConfig", "DataConfig", "EvaluationConfig",
           "ExportConfig", "FileSource", "GenerateSource", "JudgeConfig", "LlamaFactorySource", "LmEvalConfig",
           "ModelConfig", "ObjectivePart", "ReportConfig", "RoundsConfig", "RunConfig", "SearchConfig", "SharedConfig",
           "SqlSource", "ToyConfig", "TrainConfig", "dump_config", "override_keys", "parse_config", "path_problems",
           "source_urls", "without_secrets"]
