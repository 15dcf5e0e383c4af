"""Clear errors for datasets that a config names but that are not registered or not on disk."""
import difflib
import os
from typing import Callable, Dict, Iterable, List, Optional, Tuple

__all__ = [
    "DatasetNotFoundError",
    "DatasetNotRegisteredError",
    "datasets_root",
    "check_dataset_paths",
    "check_datasets",
]

README_HINT = "datasets/README.md"


def datasets_root(root=None) -> str:
    """The datasets root: ``root`` if given, else ``$DETECTRON2_DATASETS`` (default ``datasets``)."""
    if root is None:
        root = os.environ.get("DETECTRON2_DATASETS", "datasets")
    return os.path.expanduser(root)


class DatasetNotFoundError(FileNotFoundError):
    """A registered dataset whose files are missing; the message names the dataset, the path and
    where the expected layout is documented."""

    def __init__(self, dataset_name: str, missing: Iterable[Tuple[str, str]],
                 key: Optional[str] = None):
        self.dataset_name = dataset_name
        self.missing = list(missing)
        self.key = key
        named = f" (named in {key})" if key else ""
        lines = [f"Dataset '{dataset_name}'{named} is registered but its files are missing:"]
        for what, path in self.missing:
            shown = path if os.path.isabs(path) else f"{path} (absolute: {os.path.abspath(path)})"
            lines.append(f"  expected {what} at {shown}")
        lines.append(
            "Set DETECTRON2_DATASETS to the folder that holds the datasets (now: "
            f"{os.environ.get('DETECTRON2_DATASETS', '<unset>, so ./datasets')}), and see "
            f"{README_HINT} for the exact on-disk layout and where to download it."
            + (f" Or remove '{dataset_name}' from {key}." if key else "")
        )
        super().__init__("\n".join(lines))


class DatasetNotRegisteredError(LookupError):
    """A config names a dataset that is not in ``DatasetCatalog``; the message names the config
    key, the dataset and the closest registered names."""

    def __init__(self, dataset_name: str, key: str, registered: Iterable[str]):
        self.dataset_name, self.key = dataset_name, key
        close = difflib.get_close_matches(dataset_name, list(registered), n=5, cutoff=0.6)
        hint = f" Closest registered names: {', '.join(close)}." if close else ""
        super().__init__(
            f"{key} names dataset '{dataset_name}', which is not registered in DatasetCatalog."
            f"{hint} Fix {key}, or register the dataset before training (this project registers "
            f"its datasets on `import csgr_distill`; see {README_HINT}).")


def check_dataset_paths(dataset_name: str, json_file: str = None, image_root: str = None) -> None:
    """Raise :class:`DatasetNotFoundError` if ``json_file`` (a file) or ``image_root`` (a
    directory) is missing."""
    missing = []
    if json_file is not None and not os.path.isfile(json_file):
        missing.append(("the annotation file", json_file))
    if image_root is not None and not os.path.isdir(image_root):
        missing.append(("the image directory", image_root))
    if missing:
        raise DatasetNotFoundError(dataset_name, missing)


def register_splits(splits: Dict[str, Tuple[str, str]], register: Callable[[str, str, str], None],
                    root: Optional[str] = None) -> List[str]:
    """``register(name, json_file, image_root)`` for every ``name -> (image_dir, json_rel)`` of
    ``splits`` (paths relative to ``root``, default ``$DETECTRON2_DATASETS``) that is not yet in
    DatasetCatalog. Returns the names registered now."""
    from detectron2.data import DatasetCatalog

    root = datasets_root(root)
    registered = set(DatasetCatalog.list())
    done = []
    for name, (image_dir, json_rel) in splits.items():
        if name not in registered:
            register(name, os.path.join(root, json_rel), os.path.join(root, image_dir))
            done.append(name)
    return done


def check_datasets(names: Iterable[str], key: str) -> None:
    """Before any training step: every dataset of ``names`` (the config key ``key``, e.g.
    ``DATASETS.TEST``) is registered and its files exist.

    The files are the ``json_file`` (a file), ``image_root`` and ``dirname`` (directories) of the
    dataset's metadata, where present. When one is missing, the dataset is loaded once with
    ``DatasetCatalog.get``: sets generated on first use (``shapes_*``) are made there and pass;
    for the others the loader fails on the missing file. A dataset without paths in its metadata
    is only checked for registration.

    Raises:
        DatasetNotRegisteredError: a name is not in ``DatasetCatalog``.
        DatasetNotFoundError: its files are missing (the message names ``key``).
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    registered = DatasetCatalog.list()
    for name in names:
        if name not in registered:
            raise DatasetNotRegisteredError(name, key, registered)
        meta = MetadataCatalog.get(name)
        missing = []
        for field, what, exists in (("json_file", "the annotation file", os.path.isfile),
                                    ("image_root", "the image directory", os.path.isdir),
                                    ("dirname", "the dataset directory", os.path.isdir)):
            path = meta.get(field, None)
            if path is not None and not exists(path):
                missing.append((f"{what} ({field})", path))
        if not missing:
            continue
        try:
            DatasetCatalog.get(name)  # generated on first use, or raises on the missing file
        except OSError as e:
            raise DatasetNotFoundError(name, missing, key=key) from e
