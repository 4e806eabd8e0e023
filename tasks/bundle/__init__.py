"""The registered model as data: one folder per model digest (weights, geometry,
thresholds, calibration, out-of-distribution gate, data version, evaluation, model card) and the registry with its
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
from tasks.bundle.calibration import (  # noqa: F401
    Calibration,
    fit_calibration,
    fit_platt,
    expected_calibration_error,
    logit,
)
from tasks.bundle.ood_gate import (  # noqa: F401
    OOD_PREFIX,
    GATE_FILE,
    INPUT_STAT_NAMES,
    STATS_MIN_SCALE,
    Gaussian,
    OODGate,
    input_statistics,
    fit_gate,
    save_gate,
    load_gate,
)
from tasks.bundle.bundle import (  # noqa: F401
    MANIFEST,
    FORMAT,
    MODEL_CARD,
    FIGURES,
    OOD_STATEMENTS,
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
