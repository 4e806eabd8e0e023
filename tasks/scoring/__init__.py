"""Scoring new studies with a bundle: studies and manifest, the precheck and the
out-of-distribution verdict, the `Scorer`, rows and JSON, the run, the score gates,
overlays and the report.
"""

from tasks.scoring.studies import (  # noqa: F401
    Study,
    row_key,
    row_keys,
    reason_of,
    sha_or_reason,
    output_name,
    list_studies,
)
from tasks.scoring.precheck import (  # noqa: F401
    REFERENCE_FILE,
    COLOUR_LIMIT,
    BLANK_LIMIT,
    NON_CHEST_PARTS,
    WORK,
    LAYOUT,
    STAT_NAMES,
    image_statistics,
    canonical_polarity,
)
# Not the function `precheck`: re-exported here it would replace the submodule as the
# package's attribute, and `from tasks.scoring import precheck` (or `import
# tasks.scoring.precheck as m`) would give the function. Import it from its module.
from tasks.scoring.verdict import (  # noqa: F401
    OOD_MODES,
    OODVerdict,
    ood_verdict,
)
from tasks.scoring.rows import (  # noqa: F401
    FLAG_COLUMNS,
    BOX_COLUMNS,
    SCHEMA,
    ScoredStudy,
    study_json,
    study_json_bytes,
    base_row,
    read_scores,
    consolidate,
)
from tasks.scoring.overlay import (  # noqa: F401
    BOX_COLOUR,
    PNG_SIGNATURE,
    TITLE_HEIGHT,
    colormap,
    display_shape,
    resize_gray,
    render_overlay,
    overlay_jpeg,
    thumbnail,
    encode_png,
    save_png,
)
from tasks.scoring.scorer import (  # noqa: F401
    class_activation_maps,
    batch_outputs,
    Scorer,
)
from tasks.scoring.gates import (  # noqa: F401
    MANIFEST_COLUMNS,
    SCORES_COLUMNS,
    validate_score_manifest,
    validate_scores,
)
from tasks.scoring.run import (  # noqa: F401
    ScoreContext,
    ScorePlan,
    plan_scoring,
    context_scorer,
    score_shard,
    run_shards,
    finish_scoring,
    score_studies,
)
from tasks.scoring.report import (  # noqa: F401
    NOT_A_DEVICE,
    run_rows,
    render_html,
    write_report,
)
from tasks.scoring.run_index import (  # noqa: F401
    INDEX_FILE,
    load_index,
    update_index,
    page_rows,
    listed_rows,
)
