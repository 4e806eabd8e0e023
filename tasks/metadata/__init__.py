"""ChestX-ray14 metadata: ingest, the patient-level split and class weights, the
synthetic demo images, and the metadata and split suites.
"""

from tasks.metadata.ingest import (  # noqa: F401
    HEADER_MAP,
    REQUIRED,
    INT_COLUMNS,
    SCHEMA,
    packaged_metadata_path,
    read_metadata_csv,
    normalize,
    to_arrow,
    write_metadata,
    read_metadata,
    run_ingest,
)
from tasks.metadata.split import (  # noqa: F401
    SPLITS,
    SPLIT_SCHEMA,
    patient_split,
    read_assignments,
    class_weights,
    write_splits,
    read_splits,
    LEAKS_CSV,
    leaking_patients,
    run_split,
)
from tasks.metadata.synth import (  # noqa: F401
    FINDING_STYLE,
    BOX_COLUMNS,
    sample_patients,
    anatomy,
    render_image,
    synthesize,
)
from tasks.metadata.suites import (  # noqa: F401
    METADATA_COLUMNS,
    SPLIT_COLUMNS,
    IMAGE_ID_REGEX,
    LABELS_REGEX,
    NO_FINDING_COMBINED_REGEX,
    validate_metadata,
    validate_split,
)
