"""``ringattn.plan``: the name ``docs/api.md`` and the ``ringattn plan`` command use for the cost model,
``ringattn.cost_model`` (this module is that module)."""

import sys

from . import cost_model

sys.modules[__name__] = cost_model
