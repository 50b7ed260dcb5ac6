"""Disk and memory a run needs, known before it starts: `autollm validate` prints them; `autollm train` and `run`
check, before the first training, that every filesystem the run writes to has room for what is still to write.

Sizes come from the model's shapes (its config.json, or the GGUF's metadata before it is converted) and the LoRA
rank and target modules each delta's rendered LLaMA-Factory config gives:
- an adapter: rank x (d_in + d_out) float32 numbers per targeted module and layer, plus the tokenizer files
  LLaMA-Factory saves beside it;
- RegMean's Grams (search.merge data-aware, as the method declares: MergeMethod.data_aware), per chunk: `full`, one
  float32 d_in x d_in matrix per distinct layer input (q/k/v read one input, gate/up another); `core`, per module
  R x R with R the sum of the deltas' ranks, plus a d_in vector;
- full weights (train.shared's base, `--full`, a GGUF's converted folder): the parameters at the base's dtype
  (float32 for a converted GGUF; an upper bound on a GPU, where LLaMA-Factory exports a float32 model in half
  precision), plus the tokenizer files.
The search holds the base weights, the deltas twice (their own factors and the `cat` adapter made of them), the copy
of the target modules' base weights `fold` takes, and, while they are computed, one chunk's Grams.

What a run has written already (a delta's done marker, a Gram file, the shared base's marker, ...) counts as done.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from .errors import UserError
from .export.best import FULL_MARKER
from .fileio import read_json
from .log import get_logger
from .merge import FOLD_COPY_BUDGET, MERGE_METHODS, data_space, merge_candidates
from .merge.grams import gram_path
from .models.gguf import MARKER as GGUF_MARKER
from .models.shape import F32, LINEAR, ModelShape, ShapeUnknown, gguf_pieces, model_shape
from .paths import ADAPTER_FILE, ALL_DELTA, MIX_DELTA, SHARED
from .train.deltas import DONE_MARKER, DeltaSpec, delta_specs
from .train.methods import METHODS
from .train.render import TEMPLATE_SAMPLE, method_template, render_template
from .train.shared_base import MARKER as SHARED_MARKER

logger = get_logger(__name__)

LF_DEFAULT_RANK = 8  # LLaMA-Factory's lora_rank
GRAM_HEADER_ENTRY = 110  # a Gram file's header entry: a module's name with dtype, shape and offsets, or its alias
WARN_SHARE = 0.8  # warn when what is left to write is within 20% of the free space
GUESS_CHUNK = "<chunk>"  # before `prepare` the chunks are not known: figures for one

SAME_INPUT = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "gate_proj": "mlp", "up_proj": "mlp"}  # one Gram


# ---- the deltas a run trains, and their LoRA shapes --------------------------------------------------------

@dataclass(frozen=True)
class Lora:
    rank: int
    targets: frozenset[str]


def lora_of(cfg, spec: DeltaSpec) -> Lora:
    """The rank and target modules of a delta's LLaMA-Factory config as autollm renders it."""
    text = render_template(method_template(cfg, spec.method), {**cfg.train.args, **spec.args},
                           **{**TEMPLATE_SAMPLE, **METHODS[spec.method].args})
    lf = yaml.safe_load(text) or {}
    target = str(lf.get("lora_target", "all"))
    names = set(LINEAR) if target == "all" else {t.strip() for t in target.split(",")} & set(LINEAR)
    return Lora(int(lf.get("lora_rank", LF_DEFAULT_RANK)), frozenset(names))


def planned_specs(cfg) -> tuple[list[DeltaSpec], bool]:
    """Every adapter the run trains (train.shared's, the deltas, train@all, train@auto_mix) and whether the chunks
    are known (prepared); before prepare: one SFT chunk (or one of the listed methods' shape)."""
    manifest = read_json(cfg.run.manifest)
    methods = cfg.train.methods if isinstance(cfg.train.methods, list) else ["sft"]
    shapes = manifest["shapes"] if manifest else {GUESS_CHUNK: METHODS[methods[0]].shape}
    sft = cfg.train.method_args.get("sft", {})
    extra = [DeltaSpec(SHARED, [SHARED], "sft", {**sft, **cfg.train.shared.args})] if cfg.train.shared else []
    if cfg.train.auto_mix and list(shapes.values()).count("sft") >= 2:
        extra.append(DeltaSpec(MIX_DELTA, [c for c, s in shapes.items() if s == "sft"], "sft", sft))
    return extra + delta_specs(cfg, shapes), manifest is not None


# ---- sizes -------------------------------------------------------------------------------------------------

def adapter_bytes(shape: ModelShape, lora: Lora) -> int:
    return F32 * shape.layers * sum(lora.rank * (i + o) for m, (i, o) in shape.linear.items() if m in lora.targets)


def full_grams(shape: ModelShape, loras: list[Lora]) -> int:
    """One d_in x d_in Gram per distinct layer input of the targeted modules (and a header entry per Gram and
    module)."""
    targeted = set().union(*(lo.targets for lo in loras))
    inputs = {SAME_INPUT.get(m, m): shape.linear[m][0] for m in targeted}
    header = GRAM_HEADER_ENTRY * (len(inputs) + len(targeted))
    return shape.layers * (F32 * sum(d * d for d in inputs.values()) + header)


def core_grams(shape: ModelShape, loras: list[Lora]) -> int:
    """Per targeted module an R x R Gram (R: the sum of the ranks targeting it) and the full Gram's diagonal (and
    their header entries: at these sizes the names weigh as much as the numbers)."""
    ranks = {m: r for m in shape.linear if (r := sum(lo.rank for lo in loras if m in lo.targets))}
    header = 3 * GRAM_HEADER_ENTRY * len(ranks)
    return shape.layers * (F32 * sum(r * r + shape.linear[m][0] for m, r in ranks.items()) + header)


GRAM_FORMS = {"full": full_grams, "core": core_grams}  # by MergeMethod.data_aware


def fold_copy_bytes(shape: ModelShape, loras: list[Lora]) -> int:
    targeted = set().union(*(lo.targets for lo in loras))
    return shape.dtype_bytes * shape.layers * sum(i * o for m, (i, o) in shape.linear.items() if m in targeted)


# ---- the plan: one row per thing written -------------------------------------------------------------------

@dataclass(frozen=True)
class Need:
    kind: str  # its row in the table
    path: Path  # exists once written (a done marker or the file), on the filesystem it lands on
    bytes: int
    only_full: bool = False  # `--full` only
    pattern: bool = False  # `path` is a glob pattern (the WebUI's model label is LLaMA-Factory's to pick)

    @property
    def done(self) -> bool:
        return bool(glob.glob(str(self.path))) if self.pattern else self.path.exists()


@dataclass
class Footprint:
    needs: list[Need]
    memory: dict[str, int]
    chunks_known: bool
    full: bool = False

    def counted(self) -> list[Need]:
        return [n for n in self.needs if self.full or not n.only_full]

    def to_write(self) -> list[Need]:
        return [n for n in self.counted() if not n.done]


@dataclass
class Planned:
    """A run's config, its base's shapes and the adapters it trains, with their LoRA shapes."""
    cfg: object
    shape: ModelShape
    specs: list[DeltaSpec]
    lora: dict[str, Lora]

    @property
    def merged(self) -> list[DeltaSpec]:
        """The deltas the search weighs."""
        return [s for s in self.specs if s.merged]

    def loaded(self, spec: DeltaSpec) -> bool:
        """The search loads it: a delta, or train@all (unless it trains on the configured base)."""
        return spec.merged or (spec.name == ALL_DELTA and not self.cfg.train.shared)

    @property
    def bank(self) -> list[Lora]:
        return [self.lora[s.name] for s in self.specs if self.loaded(s)]

    def adapter(self, spec: DeltaSpec) -> int:
        return adapter_bytes(self.shape, self.lora[spec.name])

    @property
    def chunk_grams(self) -> int:
        """One chunk's Gram file in the form the merge method declares (0 for a method without data)."""
        space = data_space(self.cfg.search.merge)
        return GRAM_FORMS[space](self.shape, [self.lora[s.name] for s in self.merged]) if space and self.merged else 0

    @property
    def full_model(self) -> int:
        return self.shape.weight_bytes + self.shape.extra_bytes

    @property
    def held_deltas(self) -> int:
        """The loaded adapters and the `cat` adapter made of them."""
        return 2 * sum(adapter_bytes(self.shape, lo) for lo in self.bank)


def adapter_rows(p: Planned) -> list[Need]:
    return [Need("adapters", p.cfg.run.delta(s.name) / DONE_MARKER, p.adapter(s) + p.shape.extra_bytes)
            for s in p.specs]


def gram_rows(p: Planned) -> list[Need]:
    space = data_space(p.cfg.search.merge)
    chunks = dict.fromkeys(s.chunk for s in p.merged) if p.chunk_grams else {}
    return [Need("Grams", gram_path(p.cfg, c, space), p.chunk_grams) for c in chunks]


def export_rows(p: Planned) -> list[Need]:
    """The merged adapter (the `cat` of every loaded adapter), its WebUI copies (and the loaded adapters' and
    train@auto_mix's), --full's model."""
    cfg, merged = p.cfg, p.held_deltas // 2
    placed = [s for s in p.specs if p.loaded(s) or s.name == MIX_DELTA] if cfg.export.deltas else []
    copies = merged + sum(p.adapter(s) for s in placed)
    webui = Path(glob.escape(str(cfg.export.saves_dir))) / "*" / "lora" / f"{cfg.run_label}-best" / ADAPTER_FILE
    return [Need("merged adapter", cfg.run.merged / ADAPTER_FILE, merged),
            Need("WebUI copies", webui, copies, pattern=True),
            Need("full export", cfg.run.merged_full / FULL_MARKER, p.full_model, only_full=True)]


def base_rows(p: Planned) -> list[Need]:
    """train.shared's base; a GGUF's conversion (a GGUF in pieces is joined into a copy while it converts)."""
    cfg, rows = p.cfg, []
    if cfg.train.shared:
        rows.append(Need("shared base", cfg.run.shared_base / SHARED_MARKER, p.full_model))
    if cfg.base_model.gguf:
        pieces = gguf_pieces(cfg.base_model.gguf)
        joined = sum(f.stat().st_size for f in pieces) if len(pieces) > 1 else 0
        rows.append(Need("GGUF conversion", Path(cfg.base_model.path) / GGUF_MARKER,
                         p.shape.params * F32 + p.shape.extra_bytes + joined))
    return rows


ROWS = [adapter_rows, gram_rows, export_rows, base_rows]  # the table, in the order it is printed


def search_memory(p: Planned) -> dict[str, int]:
    """The search's host memory: base weights, adapters, `fold`'s copy where used, one chunk's Grams being summed."""
    held = p.shape.weight_bytes + p.held_deltas
    return {"base weights": p.shape.weight_bytes, "deltas": p.held_deltas,
            "fold copy": fold_copy(p.cfg, fold_copy_bytes(p.shape, p.bank), held), "one chunk's Grams": p.chunk_grams}


def fold_copy(cfg, copy: int, held: int) -> int:
    """What `fold` copies, where the search will use it (search.apply; `auto` as WeightedDeltas.fold_fits)."""
    apply, spec = cfg.search.apply, MERGE_METHODS[merge_candidates(cfg.search.merge)[0]]
    folds = apply == "fold" or not spec.low_rank or (apply == "auto" and copy <= FOLD_COPY_BUDGET * held)
    return copy if folds else 0


def footprint(cfg, full: bool = False) -> Footprint:
    """What this run writes (one row per file or folder) and the search's peak host memory. ShapeUnknown when the
    base model's shapes cannot be read yet."""
    specs, known = planned_specs(cfg)
    p = Planned(cfg, model_shape(cfg), specs, {s.name: lora_of(cfg, s) for s in specs})
    return Footprint([n for rows in ROWS for n in rows(p)], search_memory(p), known, full)


# ---- free space --------------------------------------------------------------------------------------------

def existing(path: Path) -> Path:
    """The path's nearest folder that exists (where it will be written)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


def free_space(path: Path) -> int:
    st = os.statvfs(existing(path))
    return st.f_bavail * st.f_frsize


def by_filesystem(needs: list[Need]) -> dict[Path, list[Need]]:
    """Rows grouped by the filesystem they land on, each group under the first row's nearest existing folder."""
    groups: dict[int, tuple[Path, list[Need]]] = {}
    for n in needs:
        where = existing(n.path.parent)
        groups.setdefault(os.stat(where).st_dev, (where, []))[1].append(n)
    return dict(groups.values())


def size(n: float) -> str:
    """Bytes in binary units, as the run's log lines give them (MB = 2**20 bytes)."""
    unit = next((u for u, k in (("GB", 3), ("MB", 2), ("KB", 1)) if n >= 1024 ** k), "B")
    k = ("B", "KB", "MB", "GB").index(unit)
    return f"{n:.0f} B" if k == 0 else f"{n / 1024 ** k:.1f} {unit}"


def by_kind(needs: list[Need]) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for n in needs:
        kinds[n.kind] = kinds.get(n.kind, 0) + n.bytes
    return kinds


def check_disk(fp: Footprint) -> list[str]:
    """Refuse (UserError, one line) when a filesystem has less free space than the run still writes there; a
    warning when it is within 20% of it. Returns one line per filesystem."""
    lines = []
    for where, needs in by_filesystem(fp.to_write()).items():
        need, free = sum(n.bytes for n in needs), free_space(where)
        parts = ", ".join(f"{k} {size(b)}" for k, b in sorted(by_kind(needs).items(), key=lambda kb: -kb[1]))
        line = f"disk: {where} gets {size(need)} more ({parts}); {size(free)} free"
        if need > free:
            raise UserError(f"{line}: not enough; free {size(need - free)} or more there, or point run_dir (or "
                            f"AUTOLLM_LF_CACHE for a GGUF's conversion) at a larger disk")
        if need > WARN_SHARE * free:
            logger.warning(f"{line}: within {1 - WARN_SHARE:.0%} of the free space")
        lines.append(line)
    return lines or ["disk: everything this run writes is written already"]


# ---- what users see ----------------------------------------------------------------------------------------

def table(fp: Footprint) -> list[str]:
    """The sizes, one line per kind of output (with what is still to write), then the search's memory."""
    todo = by_kind(fp.to_write())
    lines = [f"  {'disk':<22} {'size':>10} {'to write':>10}"]
    for kind, b in by_kind(fp.needs).items():
        n = sum(1 for x in fp.needs if x.kind == kind)
        label = f"{kind} ({n})" if n > 1 else kind
        later = "   (with --full)" if kind == "full export" and not fp.full else ""
        lines.append(f"  {label:<22} {size(b):>10} {size(todo.get(kind, 0)):>10}{later}")
    total = sum(n.bytes for n in fp.counted())
    lines.append(f"  {'total':<22} {size(total):>10} {size(sum(todo.values())):>10}")
    if not fp.chunks_known:
        lines.append(f"  (the chunks are known after `prepare`: these figures are for one chunk, {GUESS_CHUNK})")
    memory = " + ".join(f"{k} {size(b)}" for k, b in fp.memory.items() if b)
    lines.append(f"  memory: search peak about {size(sum(fp.memory.values()))} ({memory}), plus activations")
    return lines


def show(cfg, full: bool = False) -> None:
    """`autollm validate`: the table, then each filesystem's free space (a UserError, after the table, when the run
    does not fit); one line when the shapes are not known yet."""
    try:
        fp = footprint(cfg, full)
    except ShapeUnknown as e:
        print(f"  sizes: not known yet ({e})")
        return
    print("\n".join(table(fp)))
    for line in check_disk(fp):
        print(f"  {line}")


def check_before_training(cfg, full: bool = False) -> None:
    """`autollm train` / `run`: the free-space check (a UserError when it fails) and the footprint, logged."""
    try:
        fp = footprint(cfg, full)
    except ShapeUnknown as e:
        logger.info(f"disk: sizes not known ({e}); not checked")
        return
    for line in check_disk(fp):
        logger.info(line)
    logger.info(f"memory: the search holds about {size(sum(fp.memory.values()))} (plus activations)")
