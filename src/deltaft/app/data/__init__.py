"""Datasets, transforms and stratified sampling for fine-tuning.

``build_datasets(data)`` accepts three layouts and returns the train, validation and test splits:

* ``DIR/train/<class>/*`` with optional ``DIR/val/<class>/*`` and ``DIR/test/<class>/*``. The class
  folders of ``val/`` and ``test/`` must be the same as those of ``train/``.
* A flat ``DIR/<class>/*``: split once into train and test, 80/20 per class
  (:func:`stratified_split` with ``TEST_FRACTION`` and the fixed seed ``TEST_SPLIT_SEED``, so every
  run seed evaluates on the same test images).
* ``tv:NAME``, a torchvision dataset (see ``TV_DATASETS``) under ``data_root``.

The training split can then be subsampled (``per_class`` or ``fraction``, stratified and seeded:
the 30/60-per-class and 15/30/50 % protocols), and a validation split can be carved out of what
remains (``val_split``). Model selection uses the validation split, never the test split.

The modules, by concern: :mod:`.images` (decoding any image file to RGB), :mod:`.folders` (image
folders as datasets, and writing them), :mod:`.sampling` (stratified subsamples and splits),
:mod:`.transforms` (training and evaluation transforms), :mod:`.seeding` (per-sample
augmentation seeds, independent of the worker count), :mod:`.sources` (where the splits come
from, and :func:`build_datasets`).

Example::

    splits = build_datasets("flowers/", image_size=224, per_class=30, val_split=0.2, seed=1)
    loader = torch.utils.data.DataLoader(splits.train, batch_size=32, shuffle=True, num_workers=4)
"""

from deltaft.app.data.folders import (
    IMAGE_EXTENSIONS,
    ImageFolder,
    class_folders,
    scan_images,
    write_image_folder,
)
from deltaft.app.data.images import MAX_ASPECT_RATIO
from deltaft.app.data.sampling import (
    check_sampling,
    check_val_split,
    stratified_indices,
    stratified_split,
)
from deltaft.app.data.seeding import SampleSeeds, SeededDataset, sample_seed
from deltaft.app.data.sources import (
    DEFAULT_DATA_ROOT,
    FAKEDATA_CLASSES,
    FAKEDATA_SIZES,
    TEST_FRACTION,
    TEST_SPLIT_SEED,
    TV_DATASETS,
    DataSplits,
    build_datasets,
)
from deltaft.app.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MAX_IMAGE_SIZE,
    MIN_IMAGE_SIZE,
    Preset,
    check_crop_scale,
    check_hflip,
    check_image_size,
    check_transform_args,
    eval_transform,
    train_transform,
)

__all__ = [
    "DEFAULT_DATA_ROOT",
    "FAKEDATA_CLASSES",
    "FAKEDATA_SIZES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "MAX_ASPECT_RATIO",
    "MAX_IMAGE_SIZE",
    "MIN_IMAGE_SIZE",
    "TEST_FRACTION",
    "TEST_SPLIT_SEED",
    "TV_DATASETS",
    "DataSplits",
    "ImageFolder",
    "Preset",
    "SampleSeeds",
    "SeededDataset",
    "build_datasets",
    "check_crop_scale",
    "check_hflip",
    "check_image_size",
    "check_sampling",
    "check_transform_args",
    "check_val_split",
    "class_folders",
    "eval_transform",
    "sample_seed",
    "scan_images",
    "stratified_indices",
    "stratified_split",
    "train_transform",
    "write_image_folder",
]
