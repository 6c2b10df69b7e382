"""Dataset readers: list the images of a facial expression dataset with canonical labels.

Every reader maps the dataset's own labels onto ``parsing.labels.EXPRESSIONS``
(0 angry, 1 disgust, 2 fear, 3 happy, 4 sad, 5 surprise, 6 neutral) by class name, never by
position. Supported formats:

``rafdb``
    RAF-DB basic emotions. Labels from ``EmoLabel/list_patition_label.txt`` (the misspelling
    is the official name), lines such as ``train_00001.jpg 5``; images from
    ``Image/aligned/train_00001_aligned.jpg``. Native labels 1..7 are Surprise, Fear, Disgust,
    Happiness, Sadness, Anger, Neutral (``RAFDB_NATIVE_LABELS``). The split is the file name
    prefix, ``train`` or ``test``.
``sfew``
    SFEW 2.0: ``Train/<Emotion>/*.png`` becomes split ``train`` and ``Val/<Emotion>/*.png``
    becomes split ``test``, because the test labels were never released and papers report
    Val. The split folders may be named ``Train_Aligned_Faces`` and ``Val_Aligned_Faces`` or
    hold the emotion folders one or two levels down (``Train/Train_Aligned_Faces/Angry``).
``folder``
    ``<root>/<split>/<class>/<image>``; the split is the folder name in lower case.
``csv``
    A manifest with a header row naming ``path``, ``label`` and ``split`` (any case; extra
    columns are ignored), by default ``<root>/manifest.csv``. ``path`` is relative to the
    dataset root, not to the manifest's folder, so names match those of the folder reader.
    ``label`` is a class name or alias, or an integer index into ``EXPRESSIONS``.

Class folder names and CSV label names match ``EXPRESSION_ALIASES`` in any case. A folder
with any other name is an error: labels are never guessed.

Messy folders are handled by these rules:

- Known junk (``Thumbs.db``, ``ehthumbs.db``, ``.DS_Store``, ``desktop.ini``, AppleDouble
  ``._*`` files, other hidden files and folders, ``__MACOSX``, and notes with extension
  ``.txt`` or ``.md`` such as ``README.txt``) is ignored and counted in the log.
- A file in a class folder whose extension is not in ``IMAGE_EXTENSIONS`` (in any case) may
  be an image in a format this project does not read, so it is a bad entry. Listed images
  that are missing and images outside any class folder are bad entries too. A bad entry raises
  ``DatasetError`` naming the file when ``on_bad="error"`` (the default). With
  ``on_bad="skip"`` it is logged, counted and recorded in ``DatasetListing.skipped``.
- Image names that differ only in case (``a.jpg`` and ``A.JPG``) are always an error,
  because they collide on case-insensitive file systems and in archives.
- Structural problems (missing label file, a bad line in a label file, an unknown class
  folder, a duplicate entry) are always an error.

Records are sorted by split, then by name. A record's ``name`` is its path relative to the
dataset root with forward slashes, e.g. ``Image/aligned/train_00001_aligned.jpg``.
"""

from __future__ import annotations

import csv
import logging
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from parsing.imageio import IMAGE_EXTENSIONS, is_image_file
from parsing.labels import EXPRESSIONS

logger = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("rafdb", "sfew", "folder", "csv")
ON_BAD_CHOICES: tuple[str, ...] = ("error", "skip")

# Accepted class names (lower case) -> canonical expression name. Every canonical name maps
# to itself; the others are spellings that published datasets use for the same class.
EXPRESSION_ALIASES: dict[str, str] = {
    **{name: name for name in EXPRESSIONS},
    "anger": "angry",
    "disgusted": "disgust",
    "fearful": "fear",
    "happiness": "happy",
    "sadness": "sad",
    "surprised": "surprise",
}

# RAF-DB basic emotion labels as listed in the RAF-DB README: 1 Surprise, 2 Fear, 3 Disgust,
# 4 Happiness, 5 Sadness, 6 Anger, 7 Neutral.
RAFDB_NATIVE_LABELS: dict[int, str] = {
    1: "surprise",
    2: "fear",
    3: "disgust",
    4: "happy",
    5: "sad",
    6: "angry",
    7: "neutral",
}
RAFDB_LABEL_FILE = PurePosixPath("EmoLabel/list_patition_label.txt")
RAFDB_LABEL_FILE_CORRECTED = PurePosixPath("EmoLabel/list_partition_label.txt")
RAFDB_ALIGNED_FOLDER = PurePosixPath("Image/aligned")
RAFDB_ORIGINAL_FOLDER = PurePosixPath("Image/original")
RAFDB_SPLITS: tuple[str, ...] = ("train", "test")

# SFEW split folder name prefix (lower case) -> split name in this project.
SFEW_SPLIT_PREFIXES: tuple[tuple[str, str], ...] = (("train", "train"), ("val", "test"))
# Folder levels searched below an SFEW split folder for the emotion folders.
SFEW_MAX_NESTING = 3

CSV_COLUMNS: tuple[str, ...] = ("path", "label", "split")
CSV_DEFAULT_NAME = "manifest.csv"

JUNK_FILE_NAMES: frozenset[str] = frozenset({"thumbs.db", "ehthumbs.db", ".ds_store", "desktop.ini"})
JUNK_FOLDER_NAMES: frozenset[str] = frozenset({"__macosx"})
JUNK_EXTENSIONS: frozenset[str] = frozenset({".txt", ".md"})

SKIP_HINT = (
    "Fix or remove the file, or pass on_bad='skip' (--on-bad skip) to skip it and record "
    "it as skipped."
)
# Skipped entries logged one by one before the log switches to a final count.
MAX_LOGGED_SKIPS = 20


class DatasetError(ValueError):
    """A dataset folder, label file or manifest that cannot be read as the given format."""


@dataclass(frozen=True)
class ImageRecord:
    """One labelled image: file path, dataset-relative name, canonical label id, split."""

    path: Path
    name: str
    label: int
    split: str


@dataclass
class DatasetListing:
    """The images of one dataset, sorted by split then name, and the entries skipped."""

    records: list[ImageRecord]
    skipped: list[dict] = field(default_factory=list)  # {"path": str, "reason": str}
    source_format: str = ""
    root: Path = Path(".")

    def counts(self) -> dict[str, dict[str, int]]:
        """Return image counts as split -> expression name -> count, every class included."""
        table = {
            split: {name: 0 for name in EXPRESSIONS}
            for split in sorted({record.split for record in self.records})
        }
        for record in self.records:
            table[record.split][EXPRESSIONS[record.label]] += 1
        return table


def expression_id(class_name: str) -> int | None:
    """Return the canonical id of a class name or alias (any case), or None when unknown."""
    canonical = EXPRESSION_ALIASES.get(class_name.strip().lower())
    if canonical is None:
        return None
    return EXPRESSIONS.index(canonical)


def allowed_class_names() -> str:
    """Return the accepted class names as text for error messages."""
    return ", ".join(sorted(EXPRESSION_ALIASES))


def format_counts_table(counts: dict[str, dict[str, int]]) -> str:
    """Format ``DatasetListing.counts()`` as a fixed-width text table with totals."""
    columns = [*EXPRESSIONS, "total"]
    split_width = max([len("split"), len("total"), *(len(split) for split in counts)])
    widths = [max(len(column), 6) for column in columns]

    def row(label: str, values: Iterable[object]) -> str:
        cells = [f"{value:>{width}}" for value, width in zip(values, widths)]
        return f"{label:<{split_width}}  " + "  ".join(cells)

    lines = [row("split", columns)]
    totals = [0] * len(EXPRESSIONS)
    for split, per_class in counts.items():
        values = [per_class.get(name, 0) for name in EXPRESSIONS]
        totals = [total + value for total, value in zip(totals, values)]
        lines.append(row(split, [*values, sum(values)]))
    lines.append(row("total", [*totals, sum(totals)]))
    return "\n".join(lines)


class SkipLog:
    """Apply the bad-entry policy: raise, or record and log a skip (rate-limited)."""

    def __init__(self, on_bad: str, skipped: list[dict] | None = None) -> None:
        if on_bad not in ON_BAD_CHOICES:
            raise ValueError(f"invalid on_bad {on_bad!r}; expected one of {ON_BAD_CHOICES}")
        self.on_bad = on_bad
        self.skipped: list[dict] = [] if skipped is None else skipped

    def bad(self, path: Path | str, reason: str) -> None:
        """Raise ``DatasetError`` for a bad entry, or record it when skipping."""
        if self.on_bad == "error":
            raise DatasetError(f"{path}: {reason}. {SKIP_HINT}")
        self.record(path, reason)

    def record(self, path: Path | str, reason: str) -> None:
        """Record a skipped entry and log it; the first ``MAX_LOGGED_SKIPS`` are logged."""
        self.skipped.append({"path": str(path), "reason": reason})
        if len(self.skipped) <= MAX_LOGGED_SKIPS:
            logger.warning("skipped %s: %s", path, reason)
        elif len(self.skipped) == MAX_LOGGED_SKIPS + 1:
            logger.warning("more entries skipped; the total is logged at the end")


@dataclass
class _Scan:
    """Counters and the bad-entry policy shared by the readers during one listing."""

    skips: SkipLog
    junk: Counter = field(default_factory=Counter)  # reason -> count
    ignored: Counter = field(default_factory=Counter)  # reason -> count

    def log_summary(self) -> None:
        for reason, count in sorted(self.junk.items()):
            logger.info("ignored %d known junk entries (%s)", count, reason)
        for reason, count in sorted(self.ignored.items()):
            logger.info("ignored %d entries: %s", count, reason)
        if self.skips.skipped:
            logger.warning("skipped %d bad entries in total", len(self.skips.skipped))


def _scan_loose_files(folder: Path, scan: _Scan, image_reason: str, other_reason: str) -> None:
    """Account for the files directly in ``folder``, where no image can carry a label.

    Known junk is counted, an image is a bad entry (``image_reason``) and any other file is
    counted as ignored under ``other_reason``.
    """
    for entry in _listdir(folder):
        if entry.is_dir():
            continue
        kind = junk_kind(entry)
        if kind is not None:
            scan.junk[kind] += 1
        elif is_image_file(entry):
            scan.skips.bad(entry, image_reason)
        else:
            scan.ignored[other_reason] += 1


def junk_kind(path: Path) -> str | None:
    """Return why ``path`` is known junk (system files, hidden entries, notes), or None."""
    name = path.name.lower()
    if name in JUNK_FILE_NAMES:
        return path.name
    if name.startswith("._"):
        return "AppleDouble ._ file"
    if name in JUNK_FOLDER_NAMES:
        return path.name
    if name.startswith("."):
        return "hidden entry"
    if path.suffix.lower() in JUNK_EXTENSIONS and not path.is_dir():
        return f"{path.suffix.lower()} note"
    return None


def _relative_name(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _listdir(folder: Path) -> list[Path]:
    return sorted(folder.iterdir(), key=lambda entry: entry.name)


def _content_folders(folder: Path, scan: _Scan | None = None) -> list[Path]:
    """Return the subfolders of ``folder`` that are not junk, counting junk ones in ``scan``."""
    folders = []
    for entry in _listdir(folder):
        if not entry.is_dir():
            continue
        kind = junk_kind(entry)
        if kind is not None:
            if scan is not None:
                scan.junk[kind] += 1
            continue
        folders.append(entry)
    return folders


def read_dataset(
    fmt: str,
    root: str | os.PathLike,
    manifest: str | os.PathLike | None = None,
    on_bad: str = "error",
) -> DatasetListing:
    """List the labelled images of a dataset of format ``fmt`` (one of ``FORMATS``).

    ``manifest`` is the CSV file for ``fmt="csv"`` (default ``<root>/manifest.csv``) and must
    be None for the other formats. ``on_bad`` is ``"error"`` or ``"skip"`` (see the module
    documentation). Raises ``DatasetError`` naming the file and the fix when the dataset
    cannot be read, and when it contains no image.
    """
    if fmt not in FORMATS:
        raise ValueError(f"invalid dataset format {fmt!r}; expected one of {FORMATS}")
    if manifest is not None and fmt != "csv":
        raise ValueError(f"a manifest is only read with format 'csv', not {fmt!r}")
    root = Path(root).absolute()
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} is not a folder")

    scan = _Scan(SkipLog(on_bad))
    readers: dict[str, Callable[[], list[ImageRecord]]] = {
        "rafdb": lambda: _read_rafdb(root, scan),
        "sfew": lambda: _read_sfew(root, scan),
        "folder": lambda: _read_folder(root, scan),
        "csv": lambda: _read_csv(root, manifest, scan),
    }
    records = readers[fmt]()
    scan.log_summary()
    if not records:
        raise DatasetError(
            f"no images found in {root} as format {fmt!r} "
            f"({len(scan.skips.skipped)} entries skipped)"
        )
    _check_case_collisions(records)
    records.sort(key=lambda record: (record.split, record.name))

    listing = DatasetListing(records, scan.skips.skipped, fmt, root)
    logger.info(
        "read %d images from %s (format %s):\n%s",
        len(records),
        root,
        fmt,
        format_counts_table(listing.counts()),
    )
    return listing


def _check_case_collisions(records: list[ImageRecord]) -> None:
    """Raise ``DatasetError`` when two image names differ only in case."""
    by_folded_name: dict[str, list[str]] = defaultdict(list)
    for record in records:
        by_folded_name[record.name.casefold()].append(record.name)
    collisions = [names for names in by_folded_name.values() if len(names) > 1]
    if not collisions:
        return
    examples = "; ".join(" and ".join(sorted(names)) for names in collisions[:10])
    raise DatasetError(
        f"{len(collisions)} groups of image names differ only in case ({examples}). "
        "They collide on case-insensitive file systems and in archives: rename or remove "
        "one file of each group."
    )


# --- RAF-DB -------------------------------------------------------------------------------


def parse_rafdb_label_file(label_file: Path) -> list[tuple[int, str, int]]:
    """Parse the RAF-DB label file into (line number, image file name, native label 1..7).

    Accepts Windows line endings, a byte-order mark, blank lines and extra whitespace.
    Raises ``DatasetError`` naming the file and line for a malformed line, a label outside
    1..7, a name without a ``train_``/``test_`` prefix, or a duplicate image name.
    """
    entries = []
    first_line: dict[str, int] = {}
    with open(label_file, encoding="utf-8-sig", newline=None) as handle:
        for line_number, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields:
                continue
            where = f"{label_file}, line {line_number}"
            if len(fields) != 2:
                raise DatasetError(
                    f"{where}: expected '<image name> <label 1..7>', found {line.strip()!r}"
                )
            file_name, label_text = fields
            try:
                native = int(label_text)
            except ValueError:
                raise DatasetError(
                    f"{where}: label {label_text!r} of {file_name} is not an integer 1..7"
                ) from None
            if native not in RAFDB_NATIVE_LABELS:
                mapping = ", ".join(f"{key} {name}" for key, name in RAFDB_NATIVE_LABELS.items())
                raise DatasetError(
                    f"{where}: label {native} of {file_name} is outside 1..7 ({mapping})"
                )
            split = file_name.split("_", 1)[0].lower()
            if split not in RAFDB_SPLITS or "_" not in file_name:
                raise DatasetError(
                    f"{where}: image name {file_name!r} does not start with 'train_' or "
                    "'test_', so its split is unknown"
                )
            if file_name in first_line:
                raise DatasetError(
                    f"{where}: {file_name} is listed again (first on line "
                    f"{first_line[file_name]})"
                )
            first_line[file_name] = line_number
            entries.append((line_number, file_name, native))
    return entries


def _rafdb_label_file(root: Path) -> Path:
    label_file = root / RAFDB_LABEL_FILE
    if label_file.is_file():
        return label_file
    corrected = root / RAFDB_LABEL_FILE_CORRECTED
    if corrected.is_file():
        logger.warning(
            "using %s; the official RAF-DB file name is %s (misspelt)",
            corrected,
            RAFDB_LABEL_FILE.name,
        )
        return corrected
    raise DatasetError(
        f"RAF-DB label file not found: {label_file}. Point --root at the folder of the "
        f"basic-emotion release, which contains {RAFDB_LABEL_FILE} (the misspelling is "
        "official) and Image/aligned/."
    )


def _index_image_folder(folder: Path, scan: _Scan) -> dict[str, Path]:
    """Map the case-folded name of every image file in ``folder`` to its path."""
    images: dict[str, Path] = {}
    for entry in _listdir(folder):
        kind = junk_kind(entry)
        if kind is not None:
            scan.junk[kind] += 1
            continue
        if entry.is_dir() or not is_image_file(entry):
            scan.ignored[f"not an image file in {folder}"] += 1
            continue
        key = entry.name.casefold()
        if key in images:
            raise DatasetError(
                f"{images[key]} and {entry} differ only in case. They collide on "
                "case-insensitive file systems and in archives: rename or remove one."
            )
        images[key] = entry
    return images


def _read_rafdb(root: Path, scan: _Scan) -> list[ImageRecord]:
    label_file = _rafdb_label_file(root)
    aligned = root / RAFDB_ALIGNED_FOLDER
    if not aligned.is_dir():
        message = f"RAF-DB aligned image folder not found: {aligned}."
        if (root / RAFDB_ORIGINAL_FOLDER).is_dir():
            message += (
                f" {root / RAFDB_ORIGINAL_FOLDER} exists, but this reader uses only the "
                "aligned 100x100 faces: extract the release's aligned images into "
                f"{RAFDB_ALIGNED_FOLDER}."
            )
        raise DatasetError(message)

    entries = parse_rafdb_label_file(label_file)
    on_disk = _index_image_folder(aligned, scan)
    listed: set[str] = set()
    records = []
    for line_number, file_name, native in entries:
        listed_name = PurePosixPath(file_name)
        image_name = f"{listed_name.stem}_aligned{listed_name.suffix}"
        image_path = on_disk.get(image_name.casefold())
        if image_path is None:
            scan.skips.bad(
                aligned / image_name,
                f"listed in {label_file} line {line_number} but the image file is missing",
            )
            continue
        listed.add(image_name.casefold())
        label = EXPRESSIONS.index(RAFDB_NATIVE_LABELS[native])
        split = file_name.split("_", 1)[0].lower()
        records.append(ImageRecord(image_path, _relative_name(image_path, root), label, split))

    unlisted = sorted(path.name for key, path in on_disk.items() if key not in listed)
    if unlisted:
        logger.info(
            "ignored %d images in %s that %s does not list (first: %s)",
            len(unlisted),
            aligned,
            label_file.name,
            unlisted[0],
        )
    return records


# --- class folders (SFEW and the generic layout) ----------------------------------------------


def _read_class_folders(parent: Path, root: Path, split: str, scan: _Scan) -> list[ImageRecord]:
    """Read ``parent/<class>/<image>``; every non-junk subfolder must be a known class."""
    class_folders = _content_folders(parent, scan)
    unknown = [folder.name for folder in class_folders if expression_id(folder.name) is None]
    if unknown:
        raise DatasetError(
            f"unknown class folder(s) {unknown} in {parent}. Allowed names (any case): "
            f"{allowed_class_names()}. Rename or remove the folder; labels are never guessed "
            "from unknown names."
        )

    _scan_loose_files(
        parent,
        scan,
        image_reason="image outside any class folder, so it has no label",
        other_reason=f"non-image file outside the class folders in {parent}",
    )

    folders_by_label: dict[int, list[str]] = defaultdict(list)
    records = []
    for folder in class_folders:
        label = expression_id(folder.name)
        folders_by_label[label].append(folder.name)
        records.extend(_read_one_class_folder(folder, root, label, split, scan))

    for label, names in folders_by_label.items():
        if len(names) > 1:
            logger.warning(
                "folders %s in %s all map to class %r; their images are merged",
                names,
                parent,
                EXPRESSIONS[label],
            )
    missing = [EXPRESSIONS[label] for label in range(len(EXPRESSIONS)) if label not in folders_by_label]
    if missing:
        logger.warning("no class folder for %s in %s", missing, parent)
    return records


def _read_one_class_folder(
    folder: Path, root: Path, label: int, split: str, scan: _Scan
) -> list[ImageRecord]:
    records = []
    for entry in _listdir(folder):
        kind = junk_kind(entry)
        if kind is not None:
            scan.junk[kind] += 1
        elif entry.is_dir():
            scan.skips.bad(entry, "folder inside a class folder; images must sit directly in it")
        elif not is_image_file(entry):
            scan.skips.bad(
                entry,
                f"extension {entry.suffix!r} is not an image extension "
                f"({', '.join(sorted(IMAGE_EXTENSIONS))}, any case)",
            )
        else:
            records.append(ImageRecord(entry, _relative_name(entry, root), label, split))
    return records


def _find_class_parent(split_folder: Path) -> Path:
    """Return the folder that contains the emotion folders: the split folder or a descendant."""
    current = split_folder
    for _ in range(SFEW_MAX_NESTING):
        subfolders = _content_folders(current)
        if any(expression_id(folder.name) is not None for folder in subfolders):
            return current
        if len(subfolders) != 1:
            break
        current = subfolders[0]
    found = [folder.name for folder in _content_folders(current)]
    raise DatasetError(
        f"no emotion folders found in {split_folder}: expected folders named "
        f"{allowed_class_names()} (any case) in it, or in a single subfolder such as "
        f"Train_Aligned_Faces; found folders {found} in {current}"
    )


def _read_sfew(root: Path, scan: _Scan) -> list[ImageRecord]:
    """Read SFEW 2.0 with Train as split "train" and Val as split "test".

    Releases differ in size: the SLFER paper counts 958 train and 436 val frames, and the
    aligned-face release has fewer (about 891 and 431) because its face detector missed some.
    ``read_dataset`` logs the counts actually read.
    """
    top_folders = _content_folders(root, scan)
    records = []
    used: set[Path] = set()
    for prefix, split in SFEW_SPLIT_PREFIXES:
        candidates = [folder for folder in top_folders if folder.name.lower().startswith(prefix)]
        if not candidates:
            raise DatasetError(
                f"SFEW {prefix!r} folder not found in {root}: expected a folder whose name "
                f"starts with {prefix.capitalize()} (any case), such as "
                f"{prefix.capitalize()} or {prefix.capitalize()}_Aligned_Faces; found "
                f"{[folder.name for folder in top_folders]}"
            )
        if len(candidates) > 1:
            raise DatasetError(
                f"several SFEW {prefix!r} folders in {root}: "
                f"{[folder.name for folder in candidates]}; keep exactly one"
            )
        used.add(candidates[0])
        class_parent = _find_class_parent(candidates[0])
        records.extend(_read_class_folders(class_parent, root, split, scan))

    for folder in top_folders:
        if folder not in used:
            logger.info("ignored folder %s: not an SFEW Train or Val folder", folder)
    for entry in _listdir(root):
        if not entry.is_dir():
            scan.ignored[f"file at the top of {root}, outside the Train and Val folders"] += 1
    return records


def _read_folder(root: Path, scan: _Scan) -> list[ImageRecord]:
    split_folders = _content_folders(root, scan)
    if not split_folders:
        raise DatasetError(f"no split folders in {root}: expected <root>/<split>/<class>/<image>")
    by_split: dict[str, list[str]] = defaultdict(list)
    for folder in split_folders:
        by_split[folder.name.lower()].append(folder.name)
    clashes = [names for names in by_split.values() if len(names) > 1]
    if clashes:
        raise DatasetError(
            f"split folders in {root} differ only in case: {clashes}; merge or rename them"
        )

    _scan_loose_files(
        root,
        scan,
        image_reason="image outside any split and class folder, so it has no label",
        other_reason=f"non-image file at the top of {root}",
    )

    records = []
    for folder in split_folders:
        records.extend(_read_class_folders(folder, root, folder.name.lower(), scan))
    return records


# --- CSV manifest -------------------------------------------------------------------------------


def parse_label(text: str) -> int | None:
    """Return the canonical id of a manifest label, or None when it is invalid.

    A label is a class name or alias from ``EXPRESSION_ALIASES`` (any case) or an integer
    index into ``EXPRESSIONS`` (0 angry ... 6 neutral).
    """
    text = text.strip()
    if text.lstrip("+-").isdigit():
        value = int(text)
        return value if 0 <= value < len(EXPRESSIONS) else None
    return expression_id(text)


def _read_csv(root: Path, manifest: str | os.PathLike | None, scan: _Scan) -> list[ImageRecord]:
    """Read a CSV manifest with a header row containing ``path``, ``label`` and ``split``.

    Backslashes in ``path`` count as separators, and absolute paths or ``..`` are rejected.
    ``label`` is parsed by ``parse_label``. ``split`` is lower-cased. Rows with every field
    empty are ignored.
    """
    manifest = root / CSV_DEFAULT_NAME if manifest is None else Path(manifest)
    if not manifest.is_file():
        raise DatasetError(f"CSV manifest not found: {manifest}")

    records = []
    first_line: dict[str, int] = {}
    with open(manifest, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames
        if not header:
            raise DatasetError(f"{manifest} is empty; expected a header row path,label,split")
        columns = {name.strip().lower(): name for name in header if name}
        missing = [column for column in CSV_COLUMNS if column not in columns]
        if missing:
            raise DatasetError(
                f"{manifest}: missing column(s) {missing}; found columns {list(header)}. "
                "The header row must name path, label and split (extra columns are ignored)."
            )

        for row in reader:
            values = {column: (row.get(columns[column]) or "").strip() for column in CSV_COLUMNS}
            if not any(values.values()):
                continue
            where = f"{manifest}, line {reader.line_num}"
            relative = _manifest_path(values["path"], where)
            label = parse_label(values["label"])
            if label is None:
                raise DatasetError(
                    f"{where}: invalid label {values['label']!r}; expected a class name "
                    f"({allowed_class_names()}, any case) or an integer 0..{len(EXPRESSIONS) - 1} "
                    f"in the order {', '.join(EXPRESSIONS)}"
                )
            if not values["split"]:
                raise DatasetError(f"{where}: the split of {values['path']!r} is empty")
            name = relative.as_posix()
            if name in first_line:
                raise DatasetError(f"{where}: {name} is listed again (first on line {first_line[name]})")
            first_line[name] = reader.line_num

            path = root.joinpath(*relative.parts)
            if not is_image_file(path):
                scan.skips.bad(path, f"listed in {where} but {path.suffix!r} is not an image extension")
            elif not path.is_file():
                scan.skips.bad(path, f"listed in {where} but the image file is missing")
            else:
                records.append(ImageRecord(path, name, label, values["split"].lower()))
    return records


def _manifest_path(text: str, where: str) -> PurePosixPath:
    if not text:
        raise DatasetError(f"{where}: the path is empty")
    relative = PurePosixPath(text.replace("\\", "/"))
    has_drive = len(text) >= 2 and text[1] == ":" and text[0].isalpha()
    if relative.is_absolute() or ".." in relative.parts or has_drive:
        raise DatasetError(
            f"{where}: path {text!r} must be relative to the dataset root and stay inside it"
        )
    return relative
