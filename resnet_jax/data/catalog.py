"""Static facts about the datasets this package knows: shapes, classes, archive file names."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path


class DatasetNotFoundError(FileNotFoundError):
    """The dataset is not available locally and cannot be fetched (e.g. offline)."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What we know about a dataset before reading it."""

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    class_names: tuple[str, ...]
    tfds_name: str | None
    # Alternative sets of official archive files; any one complete set is enough.
    archive_sets: tuple[tuple[str, ...], ...] = ()
    # Extra directories searched for the archive files (e.g. Debian's packaged copy).
    system_dirs: tuple[str, ...] = ()
    # Class folders define the classes (any subset, e.g. a few ImageNet wnids), not this entry.
    classes_from_data: bool = False


_CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
_FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# The fine labels in label order (alphabetical), as the archives' meta files list them.
_CIFAR100_CLASSES = tuple(
    """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus
    butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch
    crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo
    keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse
    mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy
    porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper
    snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television
    tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm""".split()
)
_DIGITS = tuple(str(i) for i in range(10))
MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"

DATASETS: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo(
        "cifar10",
        10,
        (32, 32, 3),
        _CIFAR10_CLASSES,
        "cifar10",
        (("cifar-10-binary.tar.gz",), ("cifar-10-python.tar.gz",)),
    ),
    "cifar100": DatasetInfo(
        "cifar100",
        100,
        (32, 32, 3),
        _CIFAR100_CLASSES,
        "cifar100",
        (("cifar-100-binary.tar.gz",), ("cifar-100-python.tar.gz",)),
    ),
    "mnist": DatasetInfo("mnist", 10, (28, 28, 1), _DIGITS, "mnist", (MNIST_FILES,)),
    "fashion_mnist": DatasetInfo(
        "fashion_mnist",
        10,
        (28, 28, 1),
        _FASHION_CLASSES,
        "fashion_mnist",
        (MNIST_FILES,),
        (FASHION_MNIST_SYSTEM_DIR,),
    ),
    "fashion_mnist_sample": DatasetInfo(
        "fashion_mnist_sample", 10, (28, 28, 1), _FASHION_CLASSES, None
    ),
    "svhn_cropped": DatasetInfo("svhn_cropped", 10, (32, 32, 3), _DIGITS, "svhn_cropped"),
    "imagenet2012": DatasetInfo(
        "imagenet2012", 1000, (224, 224, 3), tuple(str(i) for i in range(1000)), "imagenet2012",
        classes_from_data=True,
    ),
}
BUNDLED = ("fashion_mnist_sample",)
# Any class-folder dataset: classes and image shape come from the data (source="folder").
IMAGE_FOLDER = "image_folder"
DATASET_NAMES = (*DATASETS, IMAGE_FOLDER)


def get_info(name: str) -> DatasetInfo:
    """Return the catalog entry for `name`, or raise ValueError listing the known names.

    `image_folder` has no entry: its classes and shape come from the data.
    """
    try:
        return DATASETS[name]
    except KeyError:
        if name == IMAGE_FOLDER:
            raise ValueError(f"{IMAGE_FOLDER!r} has no catalogue entry: its classes and image "
                             "shape come from the data") from None
        raise ValueError(
            f"Unknown dataset name {name!r}; known datasets: {', '.join(sorted(DATASET_NAMES))}"
        ) from None


def default_search_dirs(data_dir: str | os.PathLike | None) -> list[Path]:
    """Directories searched for archives: the configured data_dir, else the env/cache defaults."""
    if data_dir:
        return [Path(data_dir).expanduser()]
    dirs = []
    if os.environ.get("RESNET_JAX_DATA"):
        dirs.append(Path(os.environ["RESNET_JAX_DATA"]).expanduser())
    dirs.append(Path("~/.cache/resnet_jax").expanduser())
    return dirs


def candidate_dirs(info: DatasetInfo, data_dir: str | os.PathLike | None) -> list[Path]:
    """Every directory that may hold `info`'s archive files, in search order.

    CIFAR archive names are unique, so they may sit directly in a data dir or in `<dir>/<name>/`.
    MNIST and Fashion-MNIST share file names, so those must be in `<dir>/<name>/`.
    """
    unique_names = info.archive_sets and info.archive_sets[0] != MNIST_FILES
    out: list[Path] = []
    for d in default_search_dirs(data_dir):
        out.append(d / info.name)
        if unique_names:
            out.append(d)
    out.extend(Path(s) for s in info.system_dirs)
    return out


def find_archive(info: DatasetInfo, data_dir: str | os.PathLike | None) -> list[Path] | None:
    """Paths of the first complete archive set found, or None."""
    for d in candidate_dirs(info, data_dir):
        for names in info.archive_sets:
            paths = [d / n for n in names]
            if all(p.is_file() for p in paths):
                return paths
    return None


def where_to_put(info: DatasetInfo, data_dir: str | os.PathLike | None) -> str:
    """Human-readable instructions naming the exact archive files and directories."""
    if not info.archive_sets:
        return f"{info.name!r} has no offline archive reader; it is available through TFDS only."
    sets = " or ".join("+".join(s) for s in info.archive_sets)
    dirs = ", ".join(str(d) for d in candidate_dirs(info, data_dir))
    return (
        f"Put the official archive file(s) {sets} into one of: {dirs} "
        "(set config.data.data_dir or $RESNET_JAX_DATA to choose the directory)."
    )
