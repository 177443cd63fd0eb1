"""sample-data: the ELPV solar-cell data set (PyPI ``elpv-dataset``, CC BY-NC-SA 4.0) as a folder
of class folders plus ``metadata.csv``, byte-identical on every machine so ``data.dvc`` matches.

Classes are the four defect probabilities the experts assigned (0, 1/3, 2/3, 1) as
``defect_000``, ``defect_033``, ``defect_067``, ``defect_100``; ``metadata.csv`` holds the solar
module type (``mono`` / ``poly``) and the probability. PNG files are copied byte for byte.
"""

from __future__ import annotations

import importlib.resources
import shutil
from pathlib import Path

from tqdm import tqdm

from imgpipe.core.fileio import atomic_path

METADATA = "metadata.csv"
LICENSE = "CC BY-NC-SA 4.0 (images, Deitsch et al., ZAE Bayern); loader code Apache-2.0"


def class_name(probability: str) -> str:
    return f"defect_{round(float(probability) * 100):03d}"


def _elpv_root() -> Path:
    return Path(str(importlib.resources.files("elpv_dataset") / "data"))


def layout() -> tuple[dict[str, Path], str]:
    """Map each target path (relative to the data folder) to its source file, plus metadata.csv."""
    root = _elpv_root()
    files: dict[str, Path] = {}
    lines = ["filepath,module_type,defect_probability"]
    for raw in (root / "labels.csv").read_text().splitlines():
        if not raw.strip():
            continue
        image, probability, module_type = raw.split()
        target = f"{class_name(probability)}/{Path(image).name}"
        files[target] = root / image
        lines.append(f"{target},{module_type},{probability}")
    return files, "\n".join(lines) + "\n"


def _matches(target: Path, files: dict[str, Path], metadata: str) -> bool:
    if not (target / METADATA).is_file() or (target / METADATA).read_text() != metadata:
        return False
    present = {p.relative_to(target).as_posix() for p in target.rglob("*.png")}
    if present != set(files):
        return False
    return all((target / rel).stat().st_size == src.stat().st_size for rel, src in files.items())


def run(target: Path, *, force: bool = False, progress: bool = True) -> int:
    """Write the sample data to ``target``; return the number of images.

    An existing folder that already holds exactly the sample data is left alone; any other
    existing folder is an error unless ``force`` (it is then replaced in one rename).
    """
    target = Path(target)
    files, metadata = layout()
    if target.exists():
        if _matches(target, files, metadata):
            print(f"sample-data: {target}/ already holds the {len(files)} ELPV images")
            return len(files)
        if not force:
            raise FileExistsError(
                f"{target}/ exists and is not the ELPV sample data; move it "
                "away or pass --force to replace it"
            )
    with atomic_path(target) as out:
        for rel, src in tqdm(
            sorted(files.items()), desc="sample-data: ELPV", unit="img", disable=not progress
        ):
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, out / rel)
        (out / METADATA).write_text(metadata)
    print(f"sample-data: wrote {len(files)} ELPV images to {target}/ (licence: {LICENSE})")
    return len(files)
