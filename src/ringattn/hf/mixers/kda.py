"""Kimi delta attention (KDA): Kimi Linear, Bailing-hybrid, GLM-5-next.

Gated DeltaNet's rule with a gate per key channel: a token multiplies the state ``(heads, K, V)`` on the left by
``(I - beta k k^T) Diag(exp(g))``, still a dense ``K x K`` transition that the rule computes itself (see
``gated_delta.py``, whose ``delta_rule`` runs both).
"""

from __future__ import annotations

from .base import MixerCall, handles
from .gated_delta import delta_rule


@handles("chunk_kimi_delta_attention", "Kimi delta attention (KDA)")
def chunked(original, call: MixerCall, *args, **kwargs):
    """The chunked rule the forward runs on a sequence."""
    return delta_rule(original, call, "Kimi delta attention (KDA)", *args, **kwargs)


@handles("recurrent_kimi_delta_attention", "Kimi delta attention (KDA), token by token")
def recurrent(original, call: MixerCall, *args, **kwargs):
    """The token-by-token rule: the forward calls it only with a cache (decoding, or the states a cache keeps),
    which a context-parallel forward refuses before; any other call runs exactly like the chunked rule."""
    return delta_rule(original, call, "Kimi delta attention (KDA)", *args, **kwargs)
