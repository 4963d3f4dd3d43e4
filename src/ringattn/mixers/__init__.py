"""Context parallelism for the token mixers of hybrid models, on ringattn's layouts.

``fragments`` says which runs of global positions every rank holds (no communication);
``run_fragments`` / ``scan_states`` pass the state of an affine-state mixer (``h_out = M @ h_in + S``:
Mamba, Mamba2, Gated DeltaNet, linear attention with decay, RG-LRU, ...; with ``kind="log"`` the stabilised
states of RWKV's WKV and xLSTM's mLSTM) between them; ``causal_conv1d``
runs a depthwise causal convolution with halos fetched from whichever ranks hold them. All are exact,
forward and backward, against one process over the whole sequence, every document from a zero state.
"""

from .fragments import Fragments, Piece, RowPlan, fragments
from .halo import causal_conv1d, causal_windows
from .state import run_fragments, scan_states
from .summaries import EMPTY_LOG_SCALE, KINDS, apply, compose, empty_state, fold, local_pieces, summary_dtype

__all__ = ["EMPTY_LOG_SCALE", "KINDS", "Fragments", "Piece", "RowPlan", "apply", "causal_conv1d", "causal_windows",
           "compose", "empty_state", "fold", "fragments", "local_pieces", "run_fragments", "scan_states",
           "summary_dtype"]
