"""Evaluating a bundle: test-split figures with intervals, calibration, subgroups, expert
labels, the out-of-distribution corpus and its report, PNG figures, the model card, refitting
the precheck reference.
"""

from tasks.evaluation.ood_corpus import (  # noqa: F401
    NEAR_SOURCE,
    SHARED_STUDIES,
    COLOUR_PHOTOS,
    GRAY_PHOTOS,
    make_ood_corpus,
)
from tasks.evaluation.evaluate import (  # noqa: F401
    PUBLISHED,
    BRANCHES,
    box_iou,
    image_side,
    read_true_boxes,
    localization,
    true_box_scales,
    any_finding_auroc,
    per_class,
    calibration_report,
    AGE_BANDS,
    subgroups,
    GOOGLE_LABELS,
    EXPERT_CLASSES,
    expert_labels,
    training_histories,
    render_figures,
    record_evaluation,
    MIN_REAL_MARKED,
    MAX_TEST_MARKED,
    real_sample_applies,
    branch_probabilities,
    split_figures,
    fusion_vs_global,
    evaluate,
    render_markdown,
    validation_markdown,
    REAL_SAMPLE_IMAGES,
    ood_detector,
    ood_metrics,
)
from tasks.evaluation.sections import (  # noqa: F401
    interval_text,
    calibration_markdown,
    subgroup_markdown,
    expert_markdown,
    render_ood,
)
from tasks.evaluation.intervals import (  # noqa: F401
    MIN_CASES,
    BCA_MAX_IMAGES,
    auroc_columns,
    class_auroc,
    image_bootstrap,
    mean_auroc,
    any_finding,
    paired_difference,
)
from tasks.evaluation.figures import (  # noqa: F401
    FIGURES as FIGURE_FILES,
    roc_figure,
    auroc_figure,
    reliability_figure,
    training_figure,
    subgroup_figure,
    ood_figure,
    roc_long,
    write_plot_data,
)
from tasks.evaluation.model_card import (  # noqa: F401
    INTENDED_USE,
    model_card,
    known_limits,
    markdown_html,
)
from tasks.evaluation.reference import (  # noqa: F401
    SYNTH_SIZES,
    FINDINGS_PER_IMAGE,
    fit_reference,
)
