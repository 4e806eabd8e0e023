"""Images in: the one loader (PNG, JPEG, DICOM), the network input geometry and
augmentation, the Parquet-indexed cache store and the image cache.
"""

from tasks.images.loader import (  # noqa: F401
    PNG_MAGIC,
    JPEG_MAGIC,
    DICOM_MAGIC_OFFSET,
    DICOM_MAGIC,
    RADIOGRAPH_MODALITIES,
    LoaderLimits,
    sniff_kind,
    load_image,
    load_image_uint8,
    to_uint8,
    colourfulness,
)
from tasks.images.geometry import (  # noqa: F401
    IMAGENET_MEAN,
    IMAGENET_STD,
    center_offset,
    crop,
    center_crop,
    random_crop_offsets,
    network_pixels_from_image,
    input_box_to_image,
    scale_box,
    augment_draws,
    augment_batch,
    to_input,
)
from tasks.images.cache_store import (  # noqa: F401
    INDEX,
    META_KEY,
    ArraySpec,
    version_dir,
    chunk_done,
    write_chunk,
    publish,
    published_meta,
    read_rejects,
    CacheReader,
)
from tasks.images.image_cache import (  # noqa: F401
    FORMAT,
    sources_digest,
    hash_sources,
    ImageCachePlan,
    source_dir_from,
    plan_image_cache,
    build_image_chunk,
    publish_image_cache,
    build_image_cache,
    image_cache_serves,
    cached_pixels,
)
