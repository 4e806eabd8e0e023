"""The ground floor, imported by everything and importing nothing of the project:
typed params, the one error type, the atomic writer, labels and branch names, the digest
helper, and the Great Expectations runner.
"""

from cxr.core.config import (  # noqa: F401
    Paths,
    SynthParams,
    SplitParams,
    AttentionParams,
    ModelParams,
    StageParams,
    AugmentParams,
    TrainParams,
    CacheParams,
    DaskParams,
    EvaluateParams,
    ScoreParams,
    NightlyParams,
    AppParams,
    DataParams,
    Params,
    load_params,
)
from cxr.core.errors import (  # noqa: F401
    DataError,
)
from cxr.core.atomic import (  # noqa: F401
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    atomic_write_json,
)
from cxr.core.labels import (  # noqa: F401
    PATHOLOGIES,
    NO_FINDING,
    VOCABULARY,
    column_name,
    LABEL_COLUMNS,
    NO_FINDING_COLUMN,
    BRANCHES,
    STAGES,
)
from cxr.core.digest import (  # noqa: F401
    reading,
    file_sha256,
    text_sha256,
)
from cxr.core.expectations import (  # noqa: F401
    register_suite,
    run_suite,
)
from cxr.core.progress import (  # noqa: F401
    Progress,
    add_listener,
    remove_listener,
    listening,
    report,
)
