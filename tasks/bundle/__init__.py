"""The registered model as data: one folder per model digest (weights, geometry,
thresholds, out-of-distribution gate, data version, evaluation) and the registry with its
`current` alias.
"""

from tasks.bundle.weights import (  # noqa: F401
    WEIGHT_FILES,
    save_weights,
    load_weights,
    load_branch,
    load_fusion,
    model_digest,
    load_agcnn,
)
from tasks.bundle.thresholds import (  # noqa: F401
    rule_key,
    operating_thresholds,
)
from tasks.bundle.ood_gate import (  # noqa: F401
    OOD_PREFIX,
    GATE_FILE,
    Gaussian,
    OODGate,
    fit_gate,
    save_gate,
    load_gate,
)
from tasks.bundle.bundle import (  # noqa: F401
    MANIFEST,
    FORMAT,
    Bundle,
    open_bundle,
    write_bundle,
    update_manifest,
)
from tasks.bundle.registry import (  # noqa: F401
    REGISTRY,
    CURRENT,
    read_registry,
    add_bundle,
    resolve_digest,
    load_bundle,
    promote,
    list_bundles,
)
