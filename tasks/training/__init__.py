"""Training the three AG-CNN stages: datasets, the crop cache, the stages, data-parallel
training, metrics, and registering the result as a bundle.
"""

from tasks.training.dataset import (  # noqa: F401
    SplitData,
    load_pixels,
    load_split,
    PixelDataset,
    TrainBatches,
)
from tasks.training.metrics import (  # noqa: F401
    computable,
    auroc_per_class,
    mean_auroc,
    bootstrap_auroc,
    roc_points,
)
from tasks.training.crop_cache import (  # noqa: F401
    FORMAT,
    VIEWS,
    crop_cache_dir,
    image_cache_dir,
    CropCachePlan,
    plan_crop_cache,
    compute_crops,
    build_crop_chunk,
    publish_crop_cache,
    build_crop_cache,
    ensure_crop_cache,
    CropSplit,
    crop_split,
    CropDataset,
)
from tasks.training.stages import (  # noqa: F401
    StageModel,
    distributed_rank_world,
    random_crops,
    epoch_generator,
    augments,
    epoch_draws,
    patience_spent,
    param_groups,
    epoch_loader,
    predict,
    train_stage,
)
from tasks.training.distributed import (  # noqa: F401
    train_distributed,
)
from tasks.training.registration import (  # noqa: F401
    data_version,
    training_data,
    split_counts,
    GATE_STATS_IMAGES,
    register,
    fit_model_gate,
    validation_branch_predictions,
    validation_predictions,
    fit_thresholds,
    refit_thresholds,
    bundle_of_working_weights,
)
