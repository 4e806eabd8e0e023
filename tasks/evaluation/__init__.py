"""Evaluating a bundle: test-split figures, the out-of-distribution corpus and its
report, refitting the precheck reference.
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
    branch_probabilities,
    split_figures,
    fusion_vs_global,
    evaluate,
    render_markdown,
    validation_markdown,
    REAL_SAMPLE_IMAGES,
    ood_detector,
    ood_metrics,
    render_ood,
)
from tasks.evaluation.reference import (  # noqa: F401
    SYNTH_SIZES,
    FINDINGS_PER_IMAGE,
    fit_reference,
)
