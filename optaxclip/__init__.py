"""optaxclip: gradient clipping for JAX, done right."""

import importlib.metadata

from optaxclip._adaptive import AdaGCState as AdaGCState
from optaxclip._adaptive import AutoClipState as AutoClipState
from optaxclip._adaptive import QuantileClipState as QuantileClipState
from optaxclip._adaptive import ZClipState as ZClipState
from optaxclip._adaptive import adagc as adagc
from optaxclip._adaptive import autoclip as autoclip
from optaxclip._adaptive import quantile_clip as quantile_clip
from optaxclip._adaptive import zclip as zclip
from optaxclip._guard import GuardState as GuardState
from optaxclip._guard import guard as guard
from optaxclip._loss_scale import LossScaleState as LossScaleState
from optaxclip._loss_scale import current_loss_scale as current_loss_scale
from optaxclip._loss_scale import loss_scale as loss_scale
from optaxclip._monitor import MonitorState as MonitorState
from optaxclip._monitor import monitor as monitor
from optaxclip._norms import global_norm as global_norm
from optaxclip._norms import leaf_norms as leaf_norms
from optaxclip._norms import unitwise_norm as unitwise_norm
from optaxclip._per_example import PerExampleClipState as PerExampleClipState
from optaxclip._per_example import microbatched_clip as microbatched_clip
from optaxclip._per_example import per_example_clip as per_example_clip
from optaxclip._pipeline import ClipState as ClipState
from optaxclip._pipeline import GroupClipState as GroupClipState
from optaxclip._static import adaptive_grad_clip as adaptive_grad_clip
from optaxclip._static import clip_by_block_rms as clip_by_block_rms
from optaxclip._static import clip_by_global_norm as clip_by_global_norm
from optaxclip._static import clip_by_group_norm as clip_by_group_norm
from optaxclip._static import clip_by_leaf_norm as clip_by_leaf_norm
from optaxclip._static import clip_by_value as clip_by_value
from optaxclip._stats import host_stats as host_stats
from optaxclip._stats import stats as stats

__version__ = importlib.metadata.version("optaxclip")

__all__ = (
    "AdaGCState",
    "AutoClipState",
    "ClipState",
    "GroupClipState",
    "GuardState",
    "LossScaleState",
    "MonitorState",
    "PerExampleClipState",
    "QuantileClipState",
    "ZClipState",
    "adagc",
    "adaptive_grad_clip",
    "autoclip",
    "clip_by_block_rms",
    "clip_by_global_norm",
    "clip_by_group_norm",
    "clip_by_leaf_norm",
    "clip_by_value",
    "current_loss_scale",
    "global_norm",
    "guard",
    "host_stats",
    "leaf_norms",
    "loss_scale",
    "microbatched_clip",
    "monitor",
    "per_example_clip",
    "quantile_clip",
    "stats",
    "unitwise_norm",
    "zclip",
)
