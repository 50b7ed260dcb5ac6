"""`metric: lm_eval`: tasks of EleutherAI's lm-evaluation-harness, scored on the in-memory merged model.

lm-eval's `HFLM` accepts a loaded model, so a trial runs the tasks on the model as the search set it: no
save, no reload. Tasks are named (lm-eval's registry) or given as local task YAML files (their folder is
added to the task manager's include path; a local JSON dataset keeps it offline). Validation and test run
their own task lists (`evaluation.lm_eval.validation` / `.test`). The score is the mean over tasks of each
task's first metric (as lm-eval reports it); per-sample scores, with the task as their chunk, give the
report's per-chunk table.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from ..errors import UserError
from ..rows import Row


def task_manager_and_names(specs: list[str]):
    """lm-eval's TaskManager (with the folders of local task YAML files included) and the task names."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("evaluation.metric lm_eval needs lm-evaluation-harness: pip install 'autollm-lf[lm_eval]' "
                        "(or lm-eval)") from None

    include, names = [], []
    for spec in specs:
        path = Path(spec)
        if path.suffix in (".yaml", ".yml") and path.is_file():
            include.append(str(path.resolve().parent))
            names.append(_task_file(path)["task"])
        else:
            names.append(spec)
    return TaskManager(include_path=sorted(set(include)) or None), names


class _TaskLoader(yaml.SafeLoader):
    """lm-eval task YAML: its `!function module.name` tags read as plain text (never resolved here)."""


_TaskLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def _task_file(path: Path) -> dict:
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_TaskLoader)  # noqa: S506 - a SafeLoader
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a valid task YAML ({type(e).__name__}); fix it") from None
    if not isinstance(data, dict) or not isinstance(data.get("task"), str):
        raise UserError(f"{path}: has no `task:` name; an lm-eval task YAML names its task (task: my_task)")
    return data


def lm_eval_problems(cfg, key: str = "evaluation.lm_eval") -> list[str]:
    """Before anything trains: every task name is one the installed harness knows (or one a local task YAML
    defines), and every local task YAML exists and names its task."""
    problems, files, names = [], [], []
    for split in ("validation", "test"):
        for i, spec in enumerate(getattr(cfg, split)):
            where = f"{key}.{split}.{i}"
            if Path(spec).suffix in (".yaml", ".yml"):
                if not Path(spec).is_file():
                    problems.append(f"{where}: task file {spec} not found")
                    continue
                try:
                    files.append(_task_file(Path(spec))["task"])
                except UserError as e:
                    problems.append(f"{where}: {e}")
            else:
                names.append((where, spec))
    if names:
        try:
            from lm_eval.tasks import TaskManager
        except ImportError:
            return problems + [f"{key}: needs lm-evaluation-harness: pip install 'autollm-lf[lm_eval]' (or lm-eval)"]
        include = sorted({str(Path(s).resolve().parent) for s in cfg.validation + cfg.test
                          if Path(s).suffix in (".yaml", ".yml") and Path(s).is_file()})
        manager = TaskManager(include_path=include or None)
        known = set(manager.all_tasks) | set(files)
        problems += [f"{where}: lm-eval has no task {name!r} (lm_eval --tasks list shows them); name one, or give a "
                     f"task YAML file" for where, name in names if name not in known]
    return problems


class LmEval:
    """Evaluator-like: `score()`, `row_scores()` and, once scored, `rows` (one per task sample)."""
    trials_need_tokenizer, scores_rows, right_or_wrong, needs_choices = True, False, True, False
    reference_tokens = False  # its tasks' samples are lm-eval's, with no reference answer to fit a loss on

    @classmethod
    def config_problems(cls, evaluation) -> list[str]:
        return lm_eval_problems(evaluation.lm_eval) if evaluation.lm_eval is not None else []

    def __init__(self, model, tokenizer, template_name: str, rows: list[Row], cfg):
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        split = rows[0]["split"] if rows else "validation"
        self.specs = getattr(cfg.lm_eval, split)
        self.manager, self.tasks = task_manager_and_names(self.specs)
        self.rows: list[Row] = []
        self.stats: dict[str, int] = {}
        self.task_scores: dict[str, float] = {}

    def _run(self) -> dict:
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=self.model, tokenizer=self.tokenizer, batch_size=self.cfg.batch_size)
        try:
            return lm_eval.simple_evaluate(model=lm, tasks=self.tasks, task_manager=self.manager, log_samples=True,
                                           num_fewshot=self.cfg.lm_eval.num_fewshot, limit=self.cfg.lm_eval.limit,
                                           verbosity="ERROR")
        except (KeyError, ValueError, FileNotFoundError) as e:
            raise UserError(f"evaluation.lm_eval: lm-eval could not run {self.specs} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); "
                            f"check the task names or YAML files") from None

    def row_scores(self) -> list[float]:
        out = self._run()
        self.rows, scores = [], []
        for task in self.tasks:
            metric = next(iter(out["configs"][task]["metric_list"]))["metric"]
            samples = out["samples"][task]
            for s in samples:
                context = s["arguments"][0][0] if s.get("arguments") else ""
                self.rows.append({"chunk": task, "prompt": context, "response": str(s.get("target", "")),
                                  "row_id": str(s.get("doc_id")), "source": "lm_eval"})
                scores.append(float(s[metric]))
            self.task_scores[task] = float(out["results"][task][f"{metric},none"])
        return scores

    def score(self) -> float:
        self.row_scores()
        return sum(self.task_scores.values()) / len(self.task_scores)
