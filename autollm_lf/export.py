"""Stage 5: the best merge as one ordinary PEFT adapter in runs/<name>/merged/, checked by reloading it."""
from __future__ import annotations

import math

from .errors import UserError
from .io import fingerprint, read_json, write_json

EXPORT_MARKER = "autollm_export.json"


def exported_score(cfg, merged_dir) -> float:
    """Score the saved adapter the way a user would load it: fresh base + PeftModel.from_pretrained."""
    from peft import PeftModel

    from .evaluate import make_evaluator
    from .merge import load_base
    from .prepare import load_split

    base, tokenizer = load_base(cfg.base_model.path)
    model = PeftModel.from_pretrained(base, str(merged_dir)).eval()
    return make_evaluator(cfg, model, tokenizer, load_split(cfg, "validation")).score()


def export_best(session) -> dict:
    cfg = session.cfg
    best = read_json(cfg.out / "search" / "best.json")
    if best is None:
        raise UserError(f"{cfg.out / 'search' / 'best.json'} missing; run `autollm search` first")
    merged = cfg.out / "merged"
    fp = fingerprint(best["weights"], session.search_fingerprint())
    done = read_json(merged / EXPORT_MARKER, {})
    if "export" not in session.force and done.get("fingerprint") == fp and (merged / "adapter_model.safetensors").exists():
        print(f"export: {merged} up to date")
        return done
    session.weighted.export(best["weights"], merged)
    score = exported_score(cfg, merged)
    info = {"fingerprint": fp, "weights": best["weights"], "search_validation": best["validation"],
            "exported_validation": score, "base_model": str(cfg.base_model.path),
            "merge": session.weighted.export_info}
    write_json(merged / EXPORT_MARKER, info)
    if cfg.search.merge != "linear":  # a truncated SVD of a full-rank merge: report the loss, do not refuse it
        m = info["merge"]
        print(f"export: {merged} ({cfg.search.merge} as rank <= {m['rank_max']} SVD: relative error per module "
              f"max {m['relative_frobenius_error_max']:.3g}, mean {m['relative_frobenius_error_mean']:.3g}; "
              f"validation {score:.4f} vs the search's {best['validation']:.4f})")
        return info
    if not math.isclose(score, best["validation"], rel_tol=1e-4, abs_tol=1e-6):  # one flipped row is far more
        raise UserError(f"exported adapter scores {score:.4f} on validation, the search found {best['validation']:.4f}; "
                        f"the merge is not exact for these adapters (see {merged / EXPORT_MARKER})")
    print(f"export: {merged} (validation {score:.4f}, same as the search's best)")
    return info
