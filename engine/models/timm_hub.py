"""Our registered models in timm's registry, so an export's config.json (timm's hub layout, written beside
model.safetensors in every checkpoint) loads with `timm.create_model('local-dir:<checkpoint folder>',
pretrained=True)` once `engine.models` is imported (timm cannot know names it does not ship: that import is the
one requirement; vit_* and cait_* weights also carry timm's own names, see engine/models/vit.py)."""
from __future__ import annotations

from pathlib import Path

from timm.models import register_model as timm_register


def _entry(name: str):
    def entry(pretrained: bool = False, pretrained_cfg=None, pretrained_cfg_overlay=None, cache_dir=None,
              pretrained_model_args=None, **kwargs):
        from engine import checkpoint
        from engine.models.registry import create_model

        model = create_model(name, **kwargs)
        cfg = pretrained_cfg if isinstance(pretrained_cfg, dict) else getattr(pretrained_cfg, "__dict__", {}) or {}
        if pretrained:
            if not cfg.get("file"):
                raise RuntimeError(f"{name}: pretrained weights come from a checkpoint folder "
                                   f"(timm.create_model('local-dir:<folder>', pretrained=True))")
            state = checkpoint.read_export(Path(cfg["file"]) / checkpoint.EXPORT_FILE)
            model.load_state_dict(state, strict=True)
        model.pretrained_cfg = dict(cfg)
        return model

    entry.__name__ = name
    entry.__qualname__ = name
    entry.__module__ = __name__
    return entry


def register_all(names) -> None:
    for name in names:
        timm_register(_entry(name))
