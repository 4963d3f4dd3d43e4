"""``register``: ring attention on transformers' attention and mask interfaces under a name."""

from __future__ import annotations

from ..layouts import check_layout
from ..validate import check_backward_exchange
from .attention import make_attention
from .loss import guard_model_loss
from .mask import make_mask
from .prepared import guard_unprepared
from .registry import SETTINGS, RingSettings


def register(group=None, layout: str = "contiguous", *, strategy: str = "ring", name: str = "ring",
             backward_exchange: str = "ring") -> None:
    """Make ``attn_implementation=name`` (default ``"ring"``) available to transformers models.

    Args:
        group: the process group the sequence is split over (None = default group).
        layout: ``"contiguous"``, ``"zigzag"``, ``"striped"`` or ``"balanced"``: must match how the inputs
            were sharded (``shard_batch(..., layout=...)``; balanced also passes the model its
            ``cu_seq_lens_q``).
        strategy: any ``ringattn.attention`` strategy (``"ring"`` by default).
        name: the attention-implementation name to register. Calling again updates the settings.
        backward_exchange: the ring's backward, ``"ring"`` or ``"direct"`` (see ``ring_attention``);
            ``"direct"`` needs a strategy with a ring (``"ring"``, ``"hybrid"``, ``"auto"``).
    """
    check_layout(layout)
    if not isinstance(strategy, str):
        raise TypeError(f"strategy must be a str, got {type(strategy).__name__}")
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str, got {name!r}")
    check_backward_exchange(backward_exchange, strategy)
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("ringattn.hf needs transformers: pip install 'ringattn[hf]'") from e
    SETTINGS[name] = RingSettings(group, layout, strategy, backward_exchange)
    AttentionInterface.register(name, make_attention(name))
    AttentionMaskInterface.register(name, make_mask(name))
    guard_model_loss()
    guard_unprepared()
