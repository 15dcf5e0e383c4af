"""Clear errors for datasets that are registered but not on disk."""
import os
from typing import Callable, Dict, Iterable, List, Optional, Tuple

__all__ = ["DatasetNotFoundError", "datasets_root", "check_dataset_paths"]

README_HINT = "datasets/README.md"


def datasets_root(root=None) -> str:
    """The datasets root: ``root`` if given, else ``$DETECTRON2_DATASETS`` (default ``datasets``)."""
    if root is None:
        root = os.environ.get("DETECTRON2_DATASETS", "datasets")
    return os.path.expanduser(root)


class DatasetNotFoundError(FileNotFoundError):
    """A registered dataset whose files are missing; the message names the dataset, the path and
    where the expected layout is documented."""

    def __init__(self, dataset_name: str, missing: Iterable[Tuple[str, str]]):
        self.dataset_name = dataset_name
        self.missing = list(missing)
        lines = [f"Dataset '{dataset_name}' is registered but its files are missing:"]
        for what, path in self.missing:
            shown = path if os.path.isabs(path) else f"{path} (absolute: {os.path.abspath(path)})"
            lines.append(f"  expected {what} at {shown}")
        lines.append(
            "Set DETECTRON2_DATASETS to the folder that holds the datasets (now: "
            f"{os.environ.get('DETECTRON2_DATASETS', '<unset>, so ./datasets')}), and see "
            f"{README_HINT} for the exact on-disk layout and where to download it."
        )
        super().__init__("\n".join(lines))


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
