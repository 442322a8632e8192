"""What every entry point does on a rank before assembling the model: logging, the model's
path, and the layout checked against the model before any weight loads."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from wanserve.engine.config import ServerConfig
from wanserve.engine.parallel.device import gpu_usable
from wanserve.engine.parallel.layout import LayoutError
from wanserve.engine.model.model_layouts import RANDOM_PREFIX, RandomModel, parse_random_model
from wanserve.engine.model.checkpoint_config import num_attention_heads, size_multiple


def setup_logging(level: str, rank: int) -> None:
    logging.basicConfig(
        level=level if rank == 0 else max(logging.getLevelName(level), logging.WARNING),
        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("xfuser", "diffusers", "transformers", "sanic.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def resolve_model_path(cfg: ServerConfig) -> Path | RandomModel:
    """The checkpoint's folder, or for `random:NAME` the published layout to build."""
    if cfg.model.startswith(RANDOM_PREFIX):
        try:
            model = parse_random_model(cfg.model)
        except ValueError as exc:
            raise SystemExit(f"--model {cfg.model}: {exc}") from None
        return model
    if cfg.is_tiny:
        from wanserve.engine.model.tiny_model import ensure_tiny_model

        return ensure_tiny_model(name=cfg.model)
    path = Path(cfg.model).expanduser()
    if not (path / "model_index.json").exists():
        raise SystemExit(f"--model {cfg.model}: no diffusers checkpoint there (model_index.json "
                         "missing); wanserve never downloads weights")
    return path


def _size_multiple(model_path: Path | RandomModel) -> int:
    if isinstance(model_path, RandomModel):
        layout = model_path.layout
        return (int(layout.vae.get("scale_factor_spatial") or 8)
                * int(layout.transformer["patch_size"][1]))
    return size_multiple(model_path)


def check_sizes(cfg: ServerConfig, model_path: Path | RandomModel) -> None:
    """The preset's size rule must give sizes the model can patchify (else diffusers would
    quietly round them down): SystemExit naming the key to set."""
    needed, multiple = _size_multiple(model_path), cfg.limits.size_multiple
    if multiple % needed:
        raise SystemExit(f"{cfg.config_path}: limits.size_multiple is {multiple}, but this "
                         f"model's widths and heights must be multiples of {needed}; set "
                         f"limits.size_multiple: {needed}")
    size = cfg.defaults.size
    if size and any(int(side) % multiple for side in size.lower().split("x")):
        raise SystemExit(f"{cfg.config_path}: defaults.size {size} is not in multiples of "
                         f"{multiple}")


def check_layout(cfg: ServerConfig, world_size: int, model_path: Path | RandomModel) -> None:
    """Raise wanserve.engine.parallel.layout.LayoutError with a message a user can act on."""
    side = cfg.limits.min_side // _size_multiple(model_path)  # pixels per token side
    min_tokens = side * side  # one latent frame at the smallest allowed size
    heads = (model_path.layout.num_attention_heads if isinstance(model_path, RandomModel)
             else num_attention_heads(model_path))
    cfg.layout.validate(world_size, heads, min_tokens)


def check_devices(local_world_size: int) -> None:
    """On a GPU host every local rank needs a GPU of its own: raise LayoutError before any rank
    fails in `torch.cuda.set_device` with "invalid device ordinal"."""
    if not gpu_usable():
        return
    import torch

    count = torch.cuda.device_count()
    if local_world_size > count:
        raise LayoutError(f"{local_world_size} ranks on this host but {count} GPU(s) visible "
                          "(CUDA_VISIBLE_DEVICES): pass --nproc of at most that")
