"""Stage 5, export: the best merge handed to LLaMA-Factory: the WebUI's saves/ layout, export.yaml (full weights) and
chat.yaml. The adapter itself is written by session.exported_adapter (the report reads it too)."""
from .best import export_best

__all__ = ["export_best"]
