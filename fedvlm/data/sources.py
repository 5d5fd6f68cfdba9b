"""Which files a site's ``--data`` path means: the train and test JSON and where their images are.

Three forms are accepted (``resolve_site_data``):

1. **A site folder** holding ``train.json`` (and optionally ``test.json``), images relative to that folder. This is
   what ``fedvlm data build`` and ``fedvlm data partition`` write.
2. **A FedVLMBench client file**, read as is from the release layout::

       RELEASE/clients/{iid,non_iid}/train/client_<i>.json     <- --data points here
       RELEASE/test/test.json                                   <- the site's test split
       RELEASE/central_training/...                             <- also accepted as a train file

   The release root is the parent of the nearest ``clients`` or ``central_training`` folder above the file. Image
   paths are looked up relative to the JSON's folder, then the release root, then ``RELEASE/images`` (first hit
   wins; a path may never leave the folder it is resolved in).
3. **Any other JSON file**: it is the train split; ``test.json`` next to it, if present and not the same file, is
   the test split; images relative to the file's folder.
4. **A Hugging Face ``datasets`` directory** (``save_to_disk``): splits ``train``/``test`` (``fedvlm.data.hf_datasets``;
   needs the optional ``datasets`` package).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from fedvlm.data.llava_json import DataError, Example, load_llava_json

RELEASE_MARKERS = ("clients", "central_training")


@dataclass(frozen=True)
class SiteData:
    """The resolved files of one site. ``test`` is ``None`` when the site has no test split."""

    train: Path | None
    test: Path | None
    release: Path | None = None  # the FedVLMBench release root, when the train file sits in one
    hf_dir: Path | None = None  # a Hugging Face datasets directory (then train/test are None)

    def load(self, split: str) -> list[Example]:
        """The examples of ``split`` ("train" or "test"); ``[]`` for a missing test split."""
        if self.hf_dir is not None:
            from fedvlm.data.hf_datasets import load_hf_split

            return load_hf_split(self.hf_dir, split)
        path = {"train": self.train, "test": self.test}[split]
        if path is None:
            return []
        return load_llava_json(path, image_root=self.image_roots(path))

    def image_roots(self, path: Path) -> tuple[Path, ...]:
        """Where ``path``'s image paths are looked up, in order."""
        if self.release is None:
            return (path.parent,)
        return (path.parent, self.release, self.release / "images")

    def train_digest(self) -> str:
        """SHA-256 of the train file's bytes (``""`` without one; a datasets directory: of its state files)."""
        if self.hf_dir is not None:
            digest = hashlib.sha256()
            for state in sorted(self.hf_dir.rglob("state.json")):
                digest.update(state.read_bytes())
            return digest.hexdigest()
        if self.train is None or not self.train.is_file():
            return ""
        return hashlib.sha256(self.train.read_bytes()).hexdigest()


def release_root(path: Path) -> Path | None:
    """The FedVLMBench release root above ``path`` (parent of the nearest ``clients``/``central_training``)."""
    for parent in Path(path).resolve().parents:
        if parent.name in RELEASE_MARKERS:
            return parent.parent
    return None


def resolve_site_data(path: Path) -> SiteData:
    """Interpret a site's ``--data`` path (see the module docstring). ``DataError`` naming the path when it is
    neither a folder with ``train.json`` nor a ``.json`` file."""
    path = Path(path)
    from fedvlm.data.hf_datasets import is_hf_dataset_dir

    if is_hf_dataset_dir(path):
        return SiteData(train=None, test=None, hf_dir=path)
    if path.is_dir():
        train = path / "train.json"
        if not train.is_file():
            raise DataError(f"{path}: a site folder must hold train.json (or point --data at a client .json file)")
        test = path / "test.json"
        return SiteData(train=train, test=test if test.is_file() else None)
    if path.suffix.lower() != ".json" or not path.is_file():
        raise DataError(f"{path}: not found, or neither a site folder nor a .json file")
    root = release_root(path)
    if root is not None:
        test = root / "test" / "test.json"
        return SiteData(train=path, test=test if test.is_file() else None, release=root)
    sibling = path.parent / "test.json"
    test = sibling if sibling.is_file() and sibling.resolve() != path.resolve() else None
    return SiteData(train=path, test=test)
